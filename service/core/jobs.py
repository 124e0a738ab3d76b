"""Job records in Redis: the single source of truth for a job's status, progress and result.

Celery's own task state cannot serve: it says PENDING for ids it never saw and expires. A job id
is the Celery task id, a UUID in its canonical form (:func:`check_job_id`), and nothing else
ever becomes part of a Redis key or a folder name: ``<id>:cancel`` or ``../x`` is no job id.
A record is a Redis hash ``smoothcert:job:<id>``; status changes go
through one Lua script so that a transition happens only from the states it names (a canceled
job never turns succeeded, a finished one never turns running again). The cancel flag is a
separate key the engine polls between batches.

The same scripts keep the jobs-by-state numbers that ``/metrics`` shows, so a scrape never
scans job records: a sorted set per in-flight state and kind (``smoothcert:metrics:jobs:<state>:<kind>``,
member = job id, score = when the record expires, in Redis-clock milliseconds) and counters of
jobs created and finished (hashes ``:created`` and ``:finished``). A record that expires while
queued or running leaves a member behind whose score has passed; the scrape drops those
(:func:`smoothcert.service.api.metrics.job_counts`), so the gauges never drift for long.

A job created with an ``owner`` (the submitting key's account,
:mod:`~smoothcert.service.core.owners`) is also a member of ``smoothcert:owner:<owner>:active``
while it is queued or running, kept by the same scripts and scored the same way;
:meth:`JobStore.create` refuses, atomically, a new job of an owner who already has ``max_active``
live members. The count is the records' own states, so a crashed API
or worker cannot make it drift: a job counts until its record says it finished, or expires.

For ``GET /v1/jobs`` the same create script adds the job to two indexes of job ids by creation
time: ``smoothcert:jobs:index:all`` and, with an owner, ``smoothcert:owner:<owner>:jobs``. Each is
a sorted set whose members all score 0 and read ``<created, ms, 15 digits>:<id>``
(:func:`index_entry`), so that lexicographic order is creation order and a page boundary is a
member (keyset pagination, no duplicates or gaps while jobs are added). A record lives
``ttl_s`` from its creation, so each create trims the entries older than that and gives the index
the same TTL: an index holds at most the jobs of one TTL and vanishes with its last record.
:meth:`JobStore.recent` skips, and removes, any entry whose record is gone all the same (a record
deleted by hand, a TTL shortened between runs), so a listed job always has its record.

A worker writes under the lease of the task it runs (a :class:`Fence`): once another worker
has taken the task over (this one stopped beating, its lease was reaped and the task sent again),
every status change it still makes is refused, however late its link comes back, so the run that
holds the lease is the one whose outcome counts.

A succeeded job's result is two fields: ``result_summary``, the result without its rows (what a
listing reads), and ``rows``, their JSON (:meth:`JobStore.succeed`; :meth:`JobStore.get` puts
them together again; a record from before has one ``result`` field, read as it is). What grows
with a job's inputs is kept on the data volume, not in Redis
(:mod:`smoothcert.service.core.results`, ``DATA_DIR/results/<id>/``), so that a record's size
does not grow with its job's: the noisy copies a certify job's worker keeps of its first inputs
for people to look at (:meth:`JobStore.keep_samples`, for ``SMOOTHCERT_SAMPLES_TTL_S``), and
rows of more than :data:`ROWS_INLINE_BYTES` of JSON (the record then holds ``rows_on_disk``,
their number, instead of ``rows``). A store made without those files (``files=None``) keeps
every result's rows in its record and no noisy copies.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

import redis

from smoothcert.service.core.contract import CertifyJob
from smoothcert.service.core.store import inside

if TYPE_CHECKING:  # results.py imports this module
    from smoothcert.service.core.results import ResultFiles

log = logging.getLogger(__name__)

PREFIX = "smoothcert:job:"
QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELED = (
    "queued",
    "running",
    "succeeded",
    "failed",
    "canceled",
)
TERMINAL = frozenset({SUCCEEDED, FAILED, CANCELED})

METRICS_PREFIX = "smoothcert:metrics:"
IN_FLIGHT = (QUEUED, RUNNING)
OWNER_PREFIX = "smoothcert:owner:"
ALL_JOBS_INDEX = "smoothcert:jobs:index:all"
CERTIFICATES_PENDING = "smoothcert:certificates:pending"  # job ids whose certificate is due
# Noisy copies kept per certify/predict job for people to look at: the first SAMPLE_ROWS rows,
# SAMPLE_COPIES copies each, fewer rows (and copies) where the inputs are so large that they would
# take more than SAMPLE_BYTES of the data volume.
SAMPLE_ROWS, SAMPLE_COPIES, SAMPLE_BYTES = 16, 8, 1 << 20
# A result whose rows take more JSON than this keeps them on the data volume, its record only the
# rest (the summary). 4 KiB is about 16 certify rows (~240 bytes each), a little more than the
# record's other fields take (~3 KiB of Redis memory for a job of one input): the interactive
# jobs of a few inputs stay whole in one hash (one read, no file), and no record takes more than
# about 7 KiB however many inputs its job had (a dataset job's provenance adds ~200 bytes per
# chunk), so Redis's budget divides by a per-job figure.
ROWS_INLINE_BYTES = 4096

# Lua, prepended to every script that sets a job's status: track(record, kind, from, to) moves the
# job between the in-flight sets (score: the record's expiry, Redis clock, ms; +inf without TTL)
# and counts a terminal state when it is entered. ``from`` is false for a new record. The keys
# are built from the kind, which is fine on the single Redis server the service uses.
# The record's owner, when it has one, keeps the job in its active set the same way.
TRACK_LUA = (
    """
local function track(record, kind, from, to)
  if from == to then return end
  local m = '"""
    + METRICS_PREFIX
    + """jobs:'
  local id = string.sub(record, """
    + str(len(PREFIX) + 1)
    + """)
  local owner = redis.call('HGET', record, 'owner')
  local active = owner and ('"""
    + OWNER_PREFIX
    + """' .. owner .. ':active') or false
  local was = from == 'queued' or from == 'running'
  local is = to == 'queued' or to == 'running'
  if was then redis.call('ZREM', m .. from .. ':' .. kind, id) end
  if active and was and not is then redis.call('ZREM', active, id) end
  if is then
    local pttl = redis.call('PTTL', record)
    local score = '+inf'
    if pttl >= 0 then
      local t = redis.call('TIME')
      score = string.format('%.0f', tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + pttl)
    end
    redis.call('SADD', m .. 'kinds', kind)
    redis.call('ZADD', m .. to .. ':' .. kind, score, id)
    if active then redis.call('ZADD', active, score, id) end
  elseif to == 'succeeded' or to == 'failed' or to == 'canceled' then
    redis.call('HINCRBY', m .. 'finished', kind .. ':' .. to, 1)
  end
end
"""
)

# KEYS[1] record, KEYS[2] the owner's active set (or any name without an owner); ARGV[1] JSON
# object of its fields (status among them, owner when there is one), ARGV[2] ttl, ARGV[3] the
# owner's quota of active jobs (0: none). Returns {1, active} when created, {0, active} when the
# owner already has ``quota`` live active jobs (nothing is written then).
# KEYS[3] the index of all jobs, KEYS[4] the owner's index (any name without an owner); ARGV[4]
# the job's index entry, ARGV[5] the exclusive lex bound below which entries are past the TTL.
_CREATE = (
    TRACK_LUA
    + """
local fields = cjson.decode(ARGV[1])
local quota = tonumber(ARGV[3])
local active = 0
if fields['owner'] then
  local t = redis.call('TIME')
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
  active = redis.call('ZCARD', KEYS[2])
  if quota > 0 and active >= quota then return {0, active} end
end
local old = redis.call('HMGET', KEYS[1], 'status', 'kind')
if old[1] then track(KEYS[1], old[2] or '', old[1], 'gone') end
for k, v in pairs(fields) do redis.call('HSET', KEYS[1], k, v) end
redis.call('EXPIRE', KEYS[1], ARGV[2])
redis.call('HINCRBY', '"""
    + METRICS_PREFIX
    + """jobs:created', fields['kind'], 1)
track(KEYS[1], fields['kind'], false, fields['status'])
local indexes = {KEYS[3]}
if fields['owner'] then indexes[2] = KEYS[4] end
for _, index in ipairs(indexes) do
  redis.call('ZREMRANGEBYLEX', index, '-', ARGV[5])
  redis.call('ZADD', index, 0, ARGV[4])
  redis.call('EXPIRE', index, ARGV[2])
end
return {1, active + 1}
"""
)


def fence_lua(key: str, field: str, token: str) -> str:
    """Lua that returns -2 from its script when the hash ``key``'s field ``field`` holds a lease
    (JSON) whose token is not ``token``; nothing happens when ``field`` is ''. The three are Lua
    expressions (``KEYS[2]``, ``ARGV[4]``): see :class:`Fence`."""
    return f"""
if {field} ~= '' then
  local held = redis.call('HGET', {key}, {field})
  if held and cjson.decode(held)['token'] ~= {token} then return -2 end
end
"""


# KEYS[1] record, KEYS[2] fence's hash; ARGV[1] new status; ARGV[2] JSON list of allowed current
# states; ARGV[3] JSON object of extra fields to set; ARGV[4], ARGV[5] the fence's field and
# token. Returns 1 when the transition happened, -2 when the fence refused it.
_TRANSITION = (
    TRACK_LUA
    + fence_lua("KEYS[2]", "ARGV[4]", "ARGV[5]")
    + """
local current = redis.call('HGET', KEYS[1], 'status')
if not current then return -1 end
local allowed = cjson.decode(ARGV[2])
for _, s in ipairs(allowed) do
  if s == current then
    redis.call('HSET', KEYS[1], 'status', ARGV[1])
    for k, v in pairs(cjson.decode(ARGV[3])) do redis.call('HSET', KEYS[1], k, v) end
    track(KEYS[1], redis.call('HGET', KEYS[1], 'kind') or '', current, ARGV[1])
    -- a dataset job that ends without a result drops its finished chunks' rows at once
    if ARGV[1] == 'canceled' or ARGV[1] == 'failed' then redis.call('DEL', KEYS[1] .. ':chunk_results') end
    return 1
  end
end
return 0
"""
)


@dataclass(frozen=True)
class Fence:
    """The lease a writer holds: field ``field`` of the hash ``key`` holds a JSON object whose
    ``token`` is the writer's. A write under a fence is refused once that field names another
    token; an absent field refuses nothing (between a reap and the next claim, or a lease lost
    with its Redis: the job's states still allow each change once)."""

    key: str
    field: str
    token: str

    @staticmethod
    def keys_args(fence: Fence | None, record: str) -> tuple[str, list[str]]:
        """The fence's hash (``record`` without a fence: any key will do) and its two
        arguments, as :func:`fence_lua` reads them."""
        return (record, ["", ""]) if fence is None else (fence.key, [fence.field, fence.token])


class ResultRowsMissing(Exception):
    """A record says its rows are on the data volume and they are not there (a volume lost or not
    mounted); the message names the file."""


class ActiveJobsExceeded(Exception):
    """The owner already has its quota of queued and running jobs; nothing was created."""

    def __init__(self, active: int, quota: int):
        super().__init__(f"{active} jobs queued or running, the quota is {quota}")
        self.active, self.quota = active, quota


def owner_key(owner: str) -> str:
    """The sorted set of ``owner``'s queued and running jobs (score: when the record expires, ms)."""
    return OWNER_PREFIX + owner + ":active"


def active_jobs(client: redis.Redis, owner: str) -> int:
    """How many of ``owner``'s jobs are queued or running (records that expired not counted)."""
    seconds, micros = client.time()
    return int(client.zcount(owner_key(owner), f"({seconds * 1000 + micros // 1000}", "+inf"))


def owner_index_key(owner: str) -> str:
    """The index of ``owner``'s jobs by creation time (the module docstring)."""
    return OWNER_PREFIX + owner + ":jobs"


_INDEX_ENTRY = re.compile(
    r"^[0-9]{15}:[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"
)


def index_entry(created_at: float, job_id: str) -> str:
    """A job's member in the indexes: creation time in ms, zero-padded so text order is time order."""
    return f"{round(created_at * 1000):015d}:{job_id}"


def is_index_entry(value: str) -> bool:
    """Whether ``value`` has the form of an :func:`index_entry` (a page cursor must)."""
    return _INDEX_ENTRY.match(value) is not None


def _name_rows(rows: list[Any], recorded: dict[str, Any] | None) -> None:
    """Give each row the ``name`` the API recorded for its input when it accepted the job (file
    names, or the request's ``names``), by row index; rows of a job without names stay as they
    are."""
    names = (recorded or {}).get("names")
    if not isinstance(names, list):
        return
    for row in rows:
        index = row.get("index") if isinstance(row, dict) else None
        if isinstance(index, int) and 0 <= index < len(names):
            row["name"] = names[index]


def rfc3339(seconds: float | None) -> str | None:
    """Unix seconds as RFC 3339 UTC with milliseconds (``2026-12-01T07:21:41.512Z``); None stays None."""
    if seconds is None:
        return None
    return (
        datetime.fromtimestamp(seconds, timezone.utc)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z")
    )


def new_job_id() -> str:
    """A fresh job id (also used as the Celery task id)."""
    return str(uuid.uuid4())


_JOB_ID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
JOB_ID_FORM = (
    "a UUID in lowercase hex, 8-4-4-4-12 digits (e.g. 3f2b8c1e-5d4a-4b6f-9e7d-0a1b2c3d4e5f)"
)
INPUTS_FILE = "inputs.npy"


class InvalidJobId(ValueError):
    """A string that is not a job id; the message says what one looks like."""


def is_job_id(value: object) -> bool:
    """Whether ``value`` is a job id as :func:`new_job_id` makes them."""
    return isinstance(value, str) and _JOB_ID.match(value) is not None


def check_job_id(value: object) -> str:
    """``value`` when it is a job id; InvalidJobId otherwise."""
    if not is_job_id(value):
        raise InvalidJobId(f"{str(value)[:80]!r} is not a job id: job ids are {JOB_ID_FORM}")
    return str(value)


def job_folder(jobs_dir: Path, job_id: str) -> Path:
    """``jobs_dir/<job id>``, where a job keeps its files (a certify job's :data:`INPUTS_FILE`, a
    training run's checkpoints). InvalidJobId for anything but a job id; ValueError when the
    folder resolves outside ``jobs_dir`` (a link placed there)."""
    return inside(jobs_dir, Path(jobs_dir) / check_job_id(job_id))


def job_inputs(jobs_dir: Path, job_id: str) -> Path:
    """The inputs file of a certify job, checked like :func:`job_folder` (the file itself too)."""
    return inside(jobs_dir, job_folder(jobs_dir, job_id) / INPUTS_FILE)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _now() -> float:
    return round(time.time(), 3)


@dataclass
class JobRecord:
    """What ``GET /v1/jobs/{id}`` shows; times are Unix seconds (and RFC 3339 in :meth:`to_dict`)."""

    id: str
    kind: str  # "certify" | "predict" | "check_model" | "train" | "train_denoiser"
    status: str = QUEUED
    done: int = 0
    total: int = 0
    created_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    error: str | None = None
    result: Any = None
    params: dict[str, Any] = field(default_factory=dict)
    cancel_requested: bool = False
    deliveries: int = 0
    owner: str | None = None  # the account that submitted it (service.core.owners)

    def certify_job(self) -> CertifyJob:
        """The certify or predict job whose parameters this record stores (ContractError, naming
        the fields, when they are not one's)."""
        return CertifyJob.from_record_params(self.params)

    @property
    def progress_unit(self) -> str:
        """What ``progress`` counts: epochs for training, inputs settled for a target-radius run
        (its sample budget is a cap), noisy samples otherwise (certify, predict, a model check)."""
        if self.kind in ("train", "train_denoiser"):
            return "epochs"
        return "inputs" if self.params.get("target_radius") is not None else "samples"

    def to_dict(self) -> dict[str, Any]:
        """The public JSON shape: progress nested, internal counters left out, each time also as
        RFC 3339 UTC text (``created_time`` beside ``created_at``, ...)."""
        return {
            "id": self.id,
            "kind": self.kind,
            "status": self.status,
            "progress": {"done": self.done, "total": self.total, "unit": self.progress_unit},
            "created_at": self.created_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "error": self.error,
            "result": self.result,
            "params": self.params,
            "cancel_requested": self.cancel_requested,
            "owner": self.owner,
            "created_time": rfc3339(self.created_at),
            "started_time": rfc3339(self.started_at),
            "finished_time": rfc3339(self.finished_at),
        }


# The hash fields a listing reads: all that _parse uses but the full result.
_LISTED_FIELDS = (
    "kind",
    "status",
    "done",
    "total",
    "created_at",
    "started_at",
    "finished_at",
    "error",
    "params",
    "deliveries",
    "result_summary",
    "owner",
)


class JobStore:
    """Create, read and update job records; every method is one or two Redis round trips (and,
    with ``files``, a file read or write where a job's noisy copies or large rows are concerned).
    With a ``fence`` (the lease of the task that writes), every status change is refused, and
    logged, once another run holds the task's lease."""

    def __init__(
        self,
        client: redis.Redis,
        ttl_s: int = 7 * 24 * 3600,
        files: ResultFiles | None = None,
        fence: Fence | None = None,
    ):
        self.redis = client
        self.ttl_s = ttl_s
        self.files = files
        self.fence = fence
        self._create = client.register_script(_CREATE)
        self._transition = client.register_script(_TRANSITION)

    @staticmethod
    def key(job_id: str) -> str:
        """The record's key; InvalidJobId unless ``job_id`` is one (callers check first and answer)."""
        return PREFIX + check_job_id(job_id)

    @staticmethod
    def cancel_key(job_id: str) -> str:
        return JobStore.key(job_id) + ":cancel"

    def create(
        self,
        job_id: str,
        kind: str,
        params: dict[str, Any],
        total: int = 0,
        *,
        owner: str | None = None,
        max_active: int = 0,
    ) -> JobRecord:
        """Write a new queued record (before the task is sent, so the worker always finds it).

        With an ``owner``, the job counts among the owner's active jobs until it finishes; with
        ``max_active`` > 0 too, ActiveJobsExceeded when the owner already has that many.
        """
        created_at = _now()
        rec = JobRecord(id=job_id, kind=kind, total=total, params=params, created_at=created_at)
        fields = {
            "kind": kind,
            "status": QUEUED,
            "done": "0",
            "total": str(total),
            "created_at": str(rec.created_at),
            "params": json.dumps(params),
            "deliveries": "0",
        }
        if owner is not None:
            fields["owner"] = owner
        expired = index_entry(
            created_at - self.ttl_s, ""
        )  # "<ms>:": entries before it are past the TTL
        created, active = self._create(
            keys=[
                self.key(job_id),
                owner_key(owner or ""),
                ALL_JOBS_INDEX,
                owner_index_key(owner or ""),
            ],
            args=[
                json.dumps(fields),
                self.ttl_s,
                max_active,
                index_entry(created_at, job_id),
                "(" + expired,
            ],
        )
        if not created:
            raise ActiveJobsExceeded(int(active), max_active)
        return rec

    def get(self, job_id: str, *, rows: bool = True) -> JobRecord | None:
        """The record, or None for an id we never created (or one that expired).

        A result whose rows are on the data volume is read whole, as it was stored
        (ResultRowsMissing when they are not there); with ``rows=False`` its ``results`` is None
        and nothing is read from disk (what the worker's status checks want).
        """
        with self.redis.pipeline() as pipe:
            pipe.hgetall(self.key(job_id))
            pipe.exists(self.cancel_key(job_id))
            raw, cancel = pipe.execute()
        record = self._parse(job_id, raw, cancel)
        if record is not None and (b"rows" in raw or b"rows_on_disk" in raw):
            summary = json.loads(raw.get(b"result_summary") or b"{}")
            if not rows:
                kept = None
            elif b"rows" in raw:
                kept = json.loads(raw[b"rows"])
            else:
                kept = self._disk_rows(job_id)
            if kept and self.files is not None:
                _name_rows(kept, self.files.certificate_inputs(job_id))
            record.result = {**summary, "results": kept}
        return record

    def _disk_rows(self, job_id: str) -> list[Any]:
        if self.files is None:
            raise ResultRowsMissing(
                f"the result rows of job {job_id} are on the data volume, which this store "
                "was not given"
            )
        return self.files.rows(job_id)

    @staticmethod
    def _parse(job_id: str, raw: dict[bytes, bytes], cancel: Any) -> JobRecord | None:
        if not raw:
            return None
        h = {k.decode(): v.decode() for k, v in raw.items()}
        num = lambda name: float(h[name]) if h.get(name) else None  # noqa: E731
        return JobRecord(
            id=job_id,
            kind=h.get("kind", ""),
            status=h.get("status", QUEUED),
            done=int(h.get("done", 0)),
            total=int(h.get("total", 0)),
            created_at=num("created_at"),
            started_at=num("started_at"),
            finished_at=num("finished_at"),
            error=h.get("error") or None,
            result=json.loads(h["result"]) if h.get("result") else None,
            params=json.loads(h.get("params") or "{}"),
            cancel_requested=bool(cancel),
            deliveries=int(h.get("deliveries", 0)),
            owner=h.get("owner") or None,
        )

    def transition(self, job_id: str, to: str, allowed_from: Iterable[str], **fields: Any) -> bool:
        """Set status ``to`` (and ``fields``) only if the current status is in ``allowed_from``
        and the store's fence, if any, still holds."""
        extra = {
            k: json.dumps(v) if k == "result" else ("" if v is None else str(v))
            for k, v in fields.items()
        }
        if isinstance(fields.get("result"), dict) and "results" in fields["result"]:
            # What a listing shows: the result without its rows, so a page of large dataset jobs
            # reads a few hundred bytes per job instead of every row of each.
            extra["result_summary"] = json.dumps({**fields["result"], "results": None})
        record = self.key(job_id)
        fence_key, fence_args = Fence.keys_args(self.fence, record)
        done = self._transition(
            keys=[record, fence_key],
            args=[to, json.dumps(list(allowed_from)), json.dumps(extra), *fence_args],
        )
        if done == -2:
            log.warning(
                "job %s was not marked %s: another worker took its task over (this one stopped "
                "beating and its lease was reaped); that run's outcome counts",
                job_id,
                to,
                extra={"job_id": job_id},
            )
        return done == 1

    def start(self, job_id: str) -> int:
        """Mark running (from queued, or running again on redelivery); return the delivery count,
        or 0 when the job is already finished or canceled and must not run."""
        if not self.transition(job_id, RUNNING, [QUEUED, RUNNING], started_at=_now()):
            return 0
        return int(self.redis.hincrby(self.key(job_id), "deliveries", 1))

    def set_progress(self, job_id: str, done: int, total: int) -> None:
        self.redis.hset(self.key(job_id), mapping={"done": int(done), "total": int(total)})

    def _certify_later(self, job_id: str, done: bool) -> bool:
        """Queue a job that just succeeded with rows for its certificate, which an API process
        signs (:mod:`smoothcert.service.core.issuer`); ``done`` passed through."""
        if done:
            self.redis.rpush(CERTIFICATES_PENDING, job_id)
        return done

    def succeed(self, job_id: str, result: Any) -> bool:
        """Record ``result`` and turn running into succeeded; False when the job was not running.

        A result with rows (``results``) is kept as two fields, so that nothing is held twice:
        ``result_summary``, the result without its rows (what a listing shows), and ``rows``,
        their JSON; :meth:`get` puts them together again. With ``files``, rows of more than
        :data:`ROWS_INLINE_BYTES` of JSON are written to the data volume first and the record
        keeps their number (``rows_on_disk``) instead. A call that loses (the job was canceled
        meanwhile) removes that file again, unless an earlier call for the same result (a retry,
        a second chunk task combining) made the job succeeded.
        """
        rows = result.get("results") if isinstance(result, dict) else None
        if not isinstance(rows, list):
            return self.transition(job_id, SUCCEEDED, [RUNNING], result=result, finished_at=_now())
        summary = json.dumps({**result, "results": None})
        rows_json = json.dumps(rows)
        if self.files is None or len(rows_json) <= ROWS_INLINE_BYTES:
            done = self.transition(
                job_id,
                SUCCEEDED,
                [RUNNING],
                result_summary=summary,
                rows=rows_json,
                finished_at=_now(),
            )
            return self._certify_later(job_id, done)
        self.files.write_rows(job_id, rows_json)
        done = self.transition(
            job_id,
            SUCCEEDED,
            [RUNNING],
            result_summary=summary,
            rows_on_disk=len(rows),
            finished_at=_now(),
        )
        if not done and self.redis.hget(self.key(job_id), "status") != SUCCEEDED.encode():
            self.files.drop_rows(job_id)
        return self._certify_later(job_id, done)

    def fail(self, job_id: str, error: str) -> bool:
        return self.transition(job_id, FAILED, [QUEUED, RUNNING], error=error, finished_at=_now())

    def mark_canceled(self, job_id: str) -> bool:
        return self.transition(job_id, CANCELED, [QUEUED, RUNNING], finished_at=_now())

    def request_cancel(self, job_id: str) -> None:
        """Raise the flag the running task polls; a queued job is canceled outright."""
        self.redis.set(self.cancel_key(job_id), 1, ex=self.ttl_s)
        self.transition(job_id, CANCELED, [QUEUED], finished_at=_now())

    def cancel_requested(self, job_id: str) -> bool:
        return bool(self.redis.exists(self.cancel_key(job_id)))

    def recent(
        self,
        owner: str | None,
        *,
        status: str | None = None,
        kind: str | None = None,
        limit: int = 20,
        after: str | None = None,
        scan: int = 1000,
    ) -> tuple[list[JobRecord], str | None]:
        """Jobs newest first: ``owner``'s (None: every job), those with ``status`` and ``kind`` when
        given, at most ``limit``, starting after the index entry ``after`` (a previous page's cursor).

        Returns the records and the cursor of the next page, None at the end. At most ``scan``
        entries are read per call, so a filter that matches few jobs returns a short (even empty)
        page with a cursor rather than reading the whole index; entries whose record is gone are
        skipped and removed.
        """
        index = ALL_JOBS_INDEX if owner is None else owner_index_key(owner)
        start = "+" if after is None else "(" + after
        picked: list[tuple[str, str]] = []  # (entry, job id)
        last: str | None = None
        scanned = 0
        while len(picked) < limit and scanned < scan:
            entries = [
                _text(e)
                for e in self.redis.zrevrangebylex(index, start, "-", 0, min(100, scan - scanned))
            ]
            if not entries:
                return self._records(picked), None
            scanned += len(entries)
            with self.redis.pipeline(transaction=False) as pipe:
                for entry in entries:
                    pipe.hmget(PREFIX + entry[16:], "status", "kind")
                states = pipe.execute()
            gone = [e for e, (s, _) in zip(entries, states) if s is None]
            if gone:
                self.redis.zrem(index, *gone)
            for entry, (s, k) in zip(entries, states):
                last = entry
                if s is not None and status in (None, _text(s)) and kind in (None, k and _text(k)):
                    picked.append((entry, entry[16:]))
                    if len(picked) == limit:
                        break
            start = "(" + entry
        more = last is not None and bool(self.redis.zrevrangebylex(index, "(" + last, "-", 0, 1))
        return self._records(picked), last if more else None

    def _records(self, picked: list[tuple[str, str]]) -> list[JobRecord]:
        """The records of ``picked`` in order, leaving out any that vanished meanwhile; a
        ``result`` with rows is read as its summary (``results`` null), the full result only for
        a record written before summaries were."""
        with self.redis.pipeline(transaction=False) as pipe:
            for _, job_id in picked:
                pipe.hmget(PREFIX + job_id, *_LISTED_FIELDS)
                pipe.hexists(PREFIX + job_id, "result")
                pipe.exists(PREFIX + job_id + ":cancel")
            raw = pipe.execute()
        records = []
        for i, (_, job_id) in enumerate(picked):
            values, has_result, cancel = raw[3 * i : 3 * i + 3]
            h = {name: v for name, v in zip(_LISTED_FIELDS, values) if v is not None}
            if "result_summary" in h:
                h["result"] = h.pop("result_summary")
            elif has_result:
                h["result"] = self.redis.hget(PREFIX + job_id, "result") or b""
            record = self._parse(job_id, {k.encode(): v for k, v in h.items()}, cancel)
            if record is not None:
                records.append(record)
        return records

    def keep_samples(self, job_id: str, rows: dict[int, bytes]) -> bool:
        """Keep ``rows`` (row index -> a ``.npy`` of its noisy copies) on the data volume for
        ``SMOOTHCERT_SAMPLES_TTL_S``; False (nothing kept) when the record is gone, or this store
        has no files."""
        if not rows or self.files is None or not self.redis.exists(self.key(job_id)):
            return False
        self.files.keep_samples(job_id, rows)
        return True

    def samples(self, job_id: str, row: int) -> bytes | None:
        """The ``.npy`` of row ``row``'s kept noisy copies, or None when none were kept for it (or
        they expired)."""
        return None if self.files is None else self.files.samples(check_job_id(job_id), row)
