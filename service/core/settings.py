"""Service settings, read from ``SMOOTHCERT_*`` environment variables (pydantic-settings).

One class for the API, the worker and ``smoothcert up``. In development an unset API key is
generated (and printed by whoever starts the process); in production an empty or well-known key,
or an admin key equal to the API key, refuses to start. The admin key defaults to the API key in
development only. The Redis password is ``SMOOTHCERT_REDIS_PASSWORD`` or the one inside
``SMOOTHCERT_REDIS_URL``; production refuses to start without one, as it does without keys.
With ``SMOOTHCERT_REDIS_SENTINELS`` the primary is the one the sentinels name
(:mod:`smoothcert.service.core.redis_client` builds every client either way).
The key pepper (the server secret of the keys made with ``POST /v1/keys``) is derived from the
admin key in development when unset, and required in production.
"""

from __future__ import annotations

import hashlib
import secrets
from pathlib import Path
from typing import Literal
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from pydantic import Field, PrivateAttr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_REDIS_MAXMEMORY = 1 << 30
# Keys nobody should run production with; a copy-pasted README value is as bad as none.
WELL_KNOWN_KEYS = frozenset({"", "changeme", "change-me", "secret", "dev", "test", "smoothcert"})


class Settings(BaseSettings):
    """Everything configurable about the service; see the field descriptions."""

    model_config = SettingsConfigDict(env_prefix="SMOOTHCERT_", extra="ignore")

    env: Literal["development", "production"] = Field(
        "development",
        description="production refuses empty, well-known or short (< 16 characters) keys, key "
        "pepper and Redis password, and an admin key equal to the API key",
    )
    host: str = Field("127.0.0.1", description="the address the API listens on")
    port: int = Field(8000, ge=1, le=65535, description="the port the API listens on")
    api_key: str = Field(
        "",
        description="bootstrap key of the account `default` (scope certify); `smoothcert up` "
        "generates one at its first start and keeps it in DATA_DIR/credentials.env; a process "
        "started alone in development generates its own when empty",
    )
    admin_key: str = Field(
        "",
        description="bootstrap key of the account `admin` (every scope: models, training, key "
        "management); `smoothcert up` generates one and keeps it beside the API key; a process "
        "started alone in development uses the API key when empty",
    )
    key_pepper: str = Field(
        "",
        description="server secret of the keyed hash (HMAC-SHA256) under which API keys made with "
        "POST /v1/keys are stored; derived from the admin key in development when empty, "
        "required in production (changing it invalidates every such key)",
    )
    signing_key_file: Path | None = Field(
        None,
        description="the Ed25519 private key (PKCS#8 PEM) with which the API signs certificates; "
        "unset: one generated at the first start under DATA_DIR/signing (0600) and kept",
    )
    data_dir: Path = Field(Path("var/data"), description="models, uploaded inputs, results")
    redis_url: str = Field(
        "", description="when set, `smoothcert up` uses it instead of starting Redis"
    )
    redis_password: str = Field(
        "",
        description="Redis's password (AUTH), added to the Redis URL; `smoothcert up` "
        "generates one for the Redis it starts; required in production",
    )
    redis_sentinels: str = Field(
        "",
        description="Redis Sentinel deployment: the sentinels, a comma list of host:port "
        "(e.g. s1:26379,s2:26379,s3:26379); when set, every client asks them for the primary of "
        "SMOOTHCERT_REDIS_MASTER_NAME (and follows a failover), SMOOTHCERT_REDIS_URL must be "
        "empty, the password is SMOOTHCERT_REDIS_PASSWORD, and `smoothcert up` starts no Redis",
    )
    redis_master_name: str = Field(
        "smoothcert",
        min_length=1,
        description="the name under which the sentinels monitor the primary (sentinel monitor NAME)",
    )
    redis_sentinel_password: str = Field(
        "",
        description="the sentinels' own password (their requirepass); empty: they ask for none",
    )
    redis_wait_replicas: int = Field(
        1,
        ge=0,
        description="with sentinels: replicas that must hold a write (WAIT) before the API "
        "acknowledges it (a 201, 202, 200 or 204 to a POST, PUT, PATCH or DELETE) and before a "
        "worker's task is acknowledged; capped at the replicas the primary has connected; 0: "
        "acknowledge without waiting (a failover may then lose the last writes)",
    )
    redis_wait_timeout_ms: int = Field(
        1000,
        ge=1,
        description="how long a write waits for its replicas (SMOOTHCERT_REDIS_WAIT_REPLICAS); "
        "past it the API answers 503 with Retry-After (the write may or may not survive a "
        "failover; retry with the same Idempotency-Key)",
    )
    redis_maxmemory: int = Field(
        DEFAULT_REDIS_MAXMEMORY,
        ge=16 << 20,
        description="memory budget, in bytes, of the Redis that `smoothcert up` starts and the "
        "compose deployment runs (maxmemory, with maxmemory-policy noeviction: past it Redis "
        "refuses writes, and the API answers 503, rather than dropping job records, queued "
        "messages or limits)",
    )
    device: str = Field("auto", description="worker device: auto, cpu, cuda, cuda:1, ...")
    batch_memory_bytes: int = Field(
        0,
        ge=0,
        description="memory one batch of noisy copies (with the model's intermediate results and scores) "
        "may take on the worker's device; a larger batch_size is lowered to fit; 0: a quarter "
        "of the memory the device has free when the job starts",
    )

    max_n: int = Field(1_000_000, ge=1, description="largest n (and n0) a job may ask for")
    max_inputs: int = Field(10_000, ge=1, description="most inputs in one certify job")
    max_request_bytes: int = Field(
        64 << 20, ge=1024, description="largest JSON/multipart certify body"
    )
    max_decoded_bytes_per_request: int = Field(
        256 << 20,
        ge=1024,
        description="most bytes a certify request's inputs may take once decoded (inputs x C x H x "
        "W x 1 byte for 8-bit images, 4 for 16-bit images and arrays), counted from the image "
        "or .npy headers before anything is decoded (413 beyond)",
    )
    max_upload_bytes: int = Field(512 << 20, ge=1024, description="largest model upload")
    max_dataset_bytes: int = Field(
        256 << 20, ge=1024, description="largest dataset upload (.npz file)"
    )
    max_dataset_unpacked_bytes: int = Field(
        1 << 30,
        ge=1024,
        description="largest x and y of a dataset .npz once unzipped, checked before unzipping",
    )
    chunk_size: int = Field(
        100,
        ge=1,
        description="inputs per task of a dataset job; with the seed it fixes the "
        "noise each input gets",
    )
    max_job_samples: int = Field(
        2_000_000_000,
        ge=1,
        description="most Monte Carlo samples one job may ask for: inputs x (n0 + n) for certify "
        "(n is the cap of a target-radius job), inputs x n for predict",
    )
    max_active_jobs_per_key: int = Field(
        20,
        ge=1,
        description="jobs one account may have queued or running at once (429 with Retry-After beyond)",
    )
    max_storage_bytes_per_key: int = Field(
        8 << 30,
        ge=1024,
        description="bytes one account may keep stored: its datasets, its models, the inputs of "
        "its queued and running certify jobs and its certificates (413 beyond); deleting a "
        "dataset, model or certificate, or a job's end, frees them. The admin account (the "
        "operator's) is not bound by it",
    )
    orphan_inputs_grace_s: int = Field(
        300,
        ge=1,
        description="the workers delete a job's saved inputs (and free their bytes of the storage "
        "quota) once they are this old and the job's record is missing (the API died before "
        "recording it) or ended; longer than an API takes from writing inputs to recording the job",
    )
    max_datasets_per_key: int = Field(
        1000,
        ge=1,
        description="datasets one account may keep, stored or being uploaded (413 beyond; "
        "deleting one frees a place); each dataset counts against the storage quota in whole "
        "blocks of the file system (its three files and its folder)",
    )

    model_check_timeout_s: float = Field(
        120.0, gt=0, description="how long an upload waits for a worker"
    )
    model_check_deadline_s: float = Field(
        60.0,
        gt=0,
        description="longest a worker lets an uploaded model take to load and answer its check "
        "batches; a slower model is refused and the process that ran it replaced",
    )
    task_time_limit_s: int = Field(
        6 * 3600,
        ge=10,
        description="hard limit of one task; the soft limit is 30 s earlier (a quarter of the limit "
        "under 2 min), and a pool process's watchdog ends a task stuck in native code "
        "10 s earlier (an eighth under 80 s)",
    )
    batch_deadline_floor_s: float = Field(
        120.0,
        gt=0,
        description="a certification batch may always run this long; past max(this, "
        "SMOOTHCERT_BATCH_DEADLINE_FACTOR x the slowest batch the task finished) its job "
        "fails and the pool process that ran it is replaced",
    )
    batch_deadline_factor: float = Field(
        10.0,
        ge=1,
        description="how many times its task's slowest finished batch a batch may take (see "
        "SMOOTHCERT_BATCH_DEADLINE_FLOOR_S)",
    )
    max_deliveries: int = Field(
        3, ge=1, description="a task redelivered more often than this fails"
    )
    job_ttl_s: int = Field(7 * 24 * 3600, ge=60, description="how long job records stay in Redis")
    certificate_retention_days: int = Field(
        365,
        ge=1,
        le=36500,
        description="how long the API keeps a signed certificate (DATA_DIR/certificates) from when "
        "it was issued; it counts against its account's storage quota "
        "(SMOOTHCERT_MAX_STORAGE_BYTES_PER_KEY) for as long, unless deleted sooner (DELETE "
        "/v1/certificates/{sha256})",
    )
    samples_ttl_s: int = Field(
        24 * 3600,
        ge=1,
        description="how long the noisy copies a job keeps for people to look at (GET "
        "/v1/jobs/{id}/samples.png) stay on the data volume (DATA_DIR/results/<id>/samples) "
        "before the workers' sweep deletes them",
    )
    worker_concurrency: int = Field(
        1, ge=1, description="pool processes per `smoothcert worker` (each runs one task at a time)"
    )
    worker_heartbeat_ttl_s: int = Field(
        10,
        ge=2,
        description="a worker whose heartbeat is older than this counts as dead; its running tasks "
        "are sent again",
    )

    max_queued_messages: int = Field(
        1000,
        ge=1,
        description="messages waiting in one Celery queue (certify or train) at which job submissions "
        "to that queue get 503 with Retry-After; a dataset job sends one message per chunk",
    )
    rate_limit_per_minute: int = Field(
        120,
        ge=0,
        description="job submissions and dataset uploads per account per minute, in bursts of up to this "
        "many (429 with Retry-After beyond); idempotent replays are free; 0 turns it off",
    )
    idempotency_ttl_s: int = Field(
        24 * 3600, ge=60, description="how long an Idempotency-Key is remembered"
    )
    log_format: Literal["json", "text"] = Field(
        "json", description="log lines of the API and the workers"
    )
    log_level: str = Field("INFO", description="Python log level of the API and the workers")
    log_max_bytes: int = Field(
        10 << 20,
        ge=4096,
        description="size at which a log file `smoothcert up` writes (DATA_DIR/logs/api.log, "
        "worker.log) is rotated: renamed .1 (the older ones .2, .3, ...) and started afresh",
    )
    log_backups: int = Field(
        5,
        ge=0,
        description="rotated files kept per log (the oldest is deleted); a log takes at most "
        "(1 + this) x SMOOTHCERT_LOG_MAX_BYTES",
    )

    http_header_timeout_s: float = Field(
        10.0,
        gt=0,
        description="a request's line and headers must arrive within this many seconds of its "
        "connection opening (or of its first byte after the previous answer): else 408 and the "
        "connection closes (a connection that sent nothing closes without an answer)",
    )
    http_body_timeout_s: float = Field(
        20.0,
        gt=0,
        description="a request body still arriving is judged every this many seconds of reading: "
        "it must have brought SMOOTHCERT_HTTP_BODY_MIN_BYTES_PER_S on average, else 408 and the "
        "connection closes",
    )
    http_body_min_bytes_per_s: int = Field(
        4096,
        ge=1,
        description="slowest average rate, in bytes per second, at which a request body may arrive "
        "(see SMOOTHCERT_HTTP_BODY_TIMEOUT_S)",
    )
    http_keep_alive_s: int = Field(
        5, ge=1, description="an idle keep-alive connection closes after this many seconds"
    )
    http_max_concurrency: int = Field(
        500,
        ge=1,
        description="open connections (or requests in progress) of one API process at which a "
        "request is answered 503; keep it below the process's open-files limit",
    )

    _generated_api_key: bool = PrivateAttr(False)

    @field_validator("signing_key_file", mode="before")
    @classmethod
    def _no_file_when_empty(cls, value: object) -> object:
        """An empty SMOOTHCERT_SIGNING_KEY_FILE (as docker/.env.example has it) means none."""
        return None if value == "" else value

    @model_validator(mode="after")
    def _keys(self) -> Settings:
        self.data_dir = self.data_dir.expanduser().resolve()
        in_url = _url_password(self.redis_url)
        if self.redis_sentinels:
            if self.redis_url:
                raise ValueError(
                    "SMOOTHCERT_REDIS_URL and SMOOTHCERT_REDIS_SENTINELS are both set; set only "
                    "one of them (the sentinels name the primary)"
                )
            if not self.sentinels:  # raises ValueError for a malformed entry
                raise ValueError("SMOOTHCERT_REDIS_SENTINELS names no sentinel")
        if in_url and self.redis_password and in_url != self.redis_password:
            raise ValueError(
                "SMOOTHCERT_REDIS_URL holds a password other than SMOOTHCERT_REDIS_PASSWORD; "
                "set only one of them"
            )
        if self.env == "production":
            for name in ("api_key", "admin_key"):
                value = getattr(self, name)
                if value.strip().lower() in WELL_KNOWN_KEYS or len(value) < 16:
                    raise ValueError(
                        f"SMOOTHCERT_{name.upper()} must be set to a secret of at least 16 characters "
                        "when SMOOTHCERT_ENV=production"
                    )
            if secrets.compare_digest(self.api_key.encode(), self.admin_key.encode()):
                raise ValueError(
                    "SMOOTHCERT_ADMIN_KEY equals SMOOTHCERT_API_KEY, so every user could upload "
                    "and delete models; set the admin key to a secret of its own when "
                    "SMOOTHCERT_ENV=production"
                )
            password = in_url or self.redis_password
            if password.strip().lower() in WELL_KNOWN_KEYS or len(password) < 16:
                raise ValueError(
                    "SMOOTHCERT_REDIS_PASSWORD (or a password in SMOOTHCERT_REDIS_URL) must be set to a "
                    "secret of at least 16 characters when SMOOTHCERT_ENV=production"
                )
            pepper = self.key_pepper
            if pepper.strip().lower() in WELL_KNOWN_KEYS or len(pepper) < 16:
                raise ValueError(
                    "SMOOTHCERT_KEY_PEPPER must be set to a secret of at least 16 characters "
                    "when SMOOTHCERT_ENV=production"
                )
        else:
            if not self.api_key:
                self.api_key = secrets.token_urlsafe(24)
                self._generated_api_key = True
            if not self.admin_key:
                self.admin_key = self.api_key
            if not self.key_pepper:  # every process that shares the admin key agrees on it
                self.key_pepper = derived_key_pepper(self.admin_key)
        return self

    @property
    def generated_api_key(self) -> bool:
        """True when this process made the API key up (development without SMOOTHCERT_API_KEY)."""
        return self._generated_api_key

    @property
    def broker_url(self) -> str:
        """The plain Redis URL (the configured one, or the default local one), with
        ``redis_password`` in it when the URL names none; not used with sentinels (see
        :mod:`smoothcert.service.core.redis_client`, which every client goes through)."""
        url = self.redis_url or DEFAULT_REDIS_URL
        if not self.redis_password or _url_password(url):
            return url
        parts = urlsplit(url)
        user = quote(unquote(parts.username or ""), safe="")
        netloc = f"{user}:{quote(self.redis_password, safe='')}@{parts.netloc.rpartition('@')[2]}"
        return urlunsplit(parts._replace(netloc=netloc))

    @property
    def sentinels(self) -> list[tuple[str, int]]:
        """``SMOOTHCERT_REDIS_SENTINELS`` as (host, port) pairs; [] without sentinels."""
        pairs = []
        for item in filter(None, (part.strip() for part in self.redis_sentinels.split(","))):
            host, sep, port = item.rpartition(":")
            host = host.strip("[]")
            if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
                raise ValueError(
                    f"SMOOTHCERT_REDIS_SENTINELS: {item!r} is not host:port (a comma list of "
                    "them, e.g. s1:26379,s2:26379,s3:26379)"
                )
            pairs.append((host, int(port)))
        return pairs

    @property
    def models_dir(self) -> Path:
        return self.data_dir / "models"

    @property
    def jobs_dir(self) -> Path:
        return self.data_dir / "jobs"

    @property
    def datasets_dir(self) -> Path:
        return self.data_dir / "datasets"

    @property
    def results_dir(self) -> Path:
        """A job's noisy copies and large result rows (smoothcert.service.core.results); not
        ``jobs_dir``, whose folders go when their job ends."""
        return self.data_dir / "results"

    @property
    def signing_dir(self) -> Path:
        """The signing keys (smoothcert.service.core.signing)."""
        return self.data_dir / "signing"

    @property
    def certificates_dir(self) -> Path:
        """Signed certificates, named by their SHA-256 (smoothcert.service.core.certificates)."""
        return self.data_dir / "certificates"


def derived_key_pepper(admin_key: str) -> str:
    """The key pepper of a development process given no SMOOTHCERT_KEY_PEPPER: a hash of the admin
    key, so that every process sharing the admin key agrees on it."""
    return hashlib.sha256(b"smoothcert-key-pepper:" + admin_key.encode()).hexdigest()


def _url_password(url: str) -> str:
    """The password inside a Redis URL (unquoted), or ""."""
    return unquote(urlsplit(url).password or "") if url else ""
