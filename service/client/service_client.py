"""A Python client of the HTTP API v1 (design §4), used by the remote `smoothcert` subcommands.

``ServiceClient`` submits certify/predict jobs, follows them to the end, fetches their TSV,
cancels them, and manages models and datasets. Every failure is a :class:`ClientError` with a
one-line message: an API error carries its status code and the server's ``detail``; an
unreachable server names the URL. No torch: httpx, tqdm, and numpy through ``inputs``.

Submissions (jobs and dataset uploads) carry a fresh ``Idempotency-Key`` and are sent again, with
the same key, when the server says to come back (429, 503, 409, with ``Retry-After``) or the
connection fails: a retry of a request whose answer was lost returns the job it created instead
of a second one. :meth:`ServiceClient.wait` rides out a server or Redis that is briefly away.
"""

from __future__ import annotations

import base64
import hashlib
import json
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

import httpx
from tqdm import tqdm

from smoothcert.service.core.contract import CertifyParams
from smoothcert.service.core.inputs import image_files

TERMINAL = frozenset({"succeeded", "failed", "canceled"})
RETRY_STATUS = frozenset(
    {409, 429, 503}
)  # answers that come with Retry-After: the request may pass later
UNAVAILABLE = frozenset({502, 503, 504})
_MIME = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}


class ClientError(ValueError):
    """A request that did not succeed; ``status_code`` is None when no answer came back."""

    def __init__(
        self,
        message: str,
        status_code: int | None = None,
        detail: Any = None,
        retry_after: float | None = None,
        answer_lost: bool = False,
    ):
        super().__init__(" ".join(message.split()))
        self.status_code = status_code
        self.detail = detail
        self.retry_after = retry_after
        self.answer_lost = (
            answer_lost  # the request may have reached the server; its answer did not come
        )


def _detail_text(detail: Any) -> str:
    """The server's ``detail`` in one line; 422 validation lists become ``field: message; ...``."""
    if isinstance(detail, list):
        parts = []
        for item in detail:
            if isinstance(item, dict):
                loc = ".".join(str(p) for p in item.get("loc", ()) if p != "body")
                parts.append(f"{loc}: {item.get('msg', '')}" if loc else str(item.get("msg", "")))
            else:
                parts.append(str(item))
        return "; ".join(parts)
    return str(detail)


class ServiceClient:
    """One connection to a smoothcert API at ``base_url``, authorized with ``api_key``.

    ``timeout`` bounds each request (seconds); a model upload, which waits until a worker has
    loaded the model, gets at least ``upload_timeout``. A submission is tried up to
    ``retries`` more times, waiting what ``Retry-After`` says (at most ``max_retry_wait_s``; a
    longer wait is reported as the error instead): Redis restarting or failing over is 503 with
    ``Retry-After: 5``, so the default rides out about 15 s of it. Use it as a context manager or
    call :meth:`close`.
    """

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        timeout: float = 30.0,
        upload_timeout: float = 300.0,
        transport: httpx.BaseTransport | None = None,
        retries: int = 3,
        max_retry_wait_s: float = 60.0,
    ):
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.upload_timeout = max(timeout, upload_timeout)
        self.retries, self.max_retry_wait_s = retries, max_retry_wait_s
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(
            base_url=self.base_url, headers=headers, timeout=timeout, transport=transport
        )

    def __enter__(self) -> ServiceClient:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # -- jobs ---------------------------------------------------------------------------------

    def submit(
        self,
        model_id: str,
        inputs: Sequence[str | Path] | None,
        sigma: float,
        *,
        n0: int | None = None,
        n: int | None = None,
        alpha: float | None = None,
        batch_size: int | None = None,
        seed: int | None = None,
        bound: str | None = None,
        mode: str | None = None,
        labels: Sequence[int] | None = None,
        radii: Sequence[float] | None = None,
        dataset_id: str | None = None,
        skip: int | None = None,
        limit: int | None = None,
        target_radius: float | None = None,
        runtime: str | None = None,
        precision: str | None = None,
        wait_s: float | None = None,
    ) -> dict:
        """:meth:`submit_job` with the parameters as keywords; those left None take the defaults
        (:mod:`smoothcert.service.core.params`, which the server uses too)."""
        given: dict[str, Any] = {
            "n0": n0,
            "n": n,
            "alpha": alpha,
            "batch_size": batch_size,
            "seed": seed,
            "bound": bound,
            "mode": mode,
            "target_radius": target_radius,
            "runtime": runtime,
            "precision": precision,
        }
        params = CertifyParams(model_id, sigma, **{k: v for k, v in given.items() if v is not None})
        return self.submit_job(
            params,
            inputs,
            labels=labels,
            radii=radii,
            dataset_id=dataset_id,
            skip=skip,
            limit=limit,
            wait_s=wait_s,
        )

    def submit_job(
        self,
        params: CertifyParams,
        inputs: Sequence[str | Path] | None = None,
        *,
        labels: Sequence[int] | None = None,
        radii: Sequence[float] | None = None,
        dataset_id: str | None = None,
        skip: int | None = None,
        limit: int | None = None,
        wait_s: float | None = None,
    ) -> dict:
        """Queue a certify (or predict) job with ``params``; the server's ``{job_id, status,
        location}``, or with ``wait_s`` (at most the server's cap, 30 s) the finished job's record
        (``{id, kind, status, ..., result}``, as :meth:`status` gives it) when the job ended
        within that many seconds (:func:`finished` tells the two apart).

        ``inputs`` is one ``.npy`` file (sent as base64 in a JSON body) or PNG/JPEG files and
        folders of them (sent as multipart, one input per image, folders in name order). Instead,
        ``dataset_id`` names an uploaded dataset, of which inputs ``[skip, skip + limit)`` are
        certified with the dataset's labels. Parameters at their defaults are left out of the
        request (the server's defaults are the same).
        """
        if (inputs is None) == (dataset_id is None):
            raise ClientError("give either inputs or a dataset id")
        body: dict[str, Any] = {
            **params.request_fields(),
            "labels": None if labels is None else [int(y) for y in labels],
            "radii": None if radii is None else [float(r) for r in radii],
            "dataset_id": dataset_id,
            "skip": skip,
            "limit": limit,
        }
        body = {k: v for k, v in body.items() if v is not None}
        waiting: dict[str, Any] = {}
        if wait_s is not None:  # the answer may take wait_s: give the request that much more
            waiting = {"params": {"wait": wait_s}, "timeout": self.timeout + float(wait_s)}
        if dataset_id is not None:
            return self._submit("/v1/certify", lambda: {"json": body, **waiting}).json()
        assert inputs is not None
        paths = [Path(p) for p in inputs]
        if len(paths) == 1 and paths[0].suffix.lower() == ".npy":
            payload = {**body, "inputs": base64.b64encode(_read(paths[0])).decode("ascii")}
            return self._submit("/v1/certify", lambda: {"json": payload, **waiting}).json()
        form = {
            k: json.dumps(v) if isinstance(v, (list, bool)) else str(v) for k, v in body.items()
        }
        files = [
            ("inputs", (p.name, _read(p), _MIME[p.suffix.lower()])) for p in image_files(paths)
        ]
        return self._submit("/v1/certify", lambda: {"data": form, "files": files, **waiting}).json()

    def status(self, job_id: str) -> dict:
        """The job record: ``{id, kind, status, progress: {done, total}, ..., error, result}``."""
        return self._request("GET", f"/v1/jobs/{_segment(job_id)}").json()

    def wait(
        self,
        job_id: str,
        timeout: float | None = None,
        progress: bool | None = None,
        poll_s: float = 0.1,
        max_poll_s: float = 2.0,
        max_outage_s: float = 120.0,
        unit: str = "samples",
    ) -> dict:
        """Poll until the job is succeeded, failed or canceled; its last record.

        Polls start every ``poll_s`` seconds and back off to ``max_poll_s``. A progress bar (in
        ``unit``: samples, or epochs for a training job) goes to stderr when ``progress`` is
        true, or by default when stderr is a terminal. After ``timeout`` seconds a ClientError
        says the job is still going (it keeps running on the server). While the server cannot be
        reached or answers 502/503/504 (a restart, Redis away), polling goes on for up to
        ``max_outage_s`` seconds in a row.
        """

        deadline = None if timeout is None else time.monotonic() + timeout
        show = sys.stderr.isatty() if progress is None else progress
        delay, record = poll_s, self.status(job_id)
        outage_since: float | None = None
        with tqdm(
            total=record["progress"]["total"] or None,
            unit=unit,
            unit_scale=unit == "samples",
            file=sys.stderr,
            disable=not show,
            dynamic_ncols=True,
            desc=job_id[:8],
        ) as bar:
            while True:
                done, total = record["progress"]["done"], record["progress"]["total"]
                if total and bar.total != total:
                    bar.total = total
                bar.set_postfix_str(record["status"], refresh=False)
                bar.update(done - bar.n)
                if record["status"] in TERMINAL:
                    return record
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise ClientError(
                        f"job {job_id} is still {record['status']} after {timeout:g} s "
                        f"({done} of {total} {unit}); it keeps running on the server"
                    )
                time.sleep(delay if left is None else min(delay, left))
                delay = min(delay * 1.5, max_poll_s)
                try:
                    record, outage_since = self.status(job_id), None
                except ClientError as exc:
                    if exc.status_code is not None and exc.status_code not in UNAVAILABLE:
                        raise
                    outage_since = outage_since or time.monotonic()
                    if time.monotonic() - outage_since > max_outage_s:
                        raise
                    bar.set_postfix_str(f"{record['status']}, server unavailable", refresh=False)

    def results_tsv(self, job_id: str) -> str:
        """A succeeded job's results in the CLI's TSV (Cohen's columns first)."""
        return self._request("GET", f"/v1/jobs/{_segment(job_id)}/results.tsv").text

    def cancel(self, job_id: str) -> dict:
        """Ask the job to stop: a queued one is canceled at once, a running one between batches."""
        return self._request("DELETE", f"/v1/jobs/{_segment(job_id)}").json()

    # -- models -------------------------------------------------------------------------------

    def upload_model(
        self,
        path: str | Path,
        *,
        name: str | None = None,
        arch: str | None = None,
        input_shape: Sequence[int] | None = None,
        num_classes: int | None = None,
        normalization: dict | str | None = None,
        sigma: float | None = None,
        class_names: Sequence[str] | None = None,
        visibility: str | None = None,
    ) -> dict:
        """Upload an .onnx or .safetensors model (a key with the ``models`` scope); its record once
        a worker checked it. It belongs to the key's account; ``visibility`` "public" lets every
        account use it (the server's default is "private").

        ``normalization`` is ``{"mean": [...], "std": [...]}`` or its JSON text; the server checks
        every field and answers 422 with its reason.
        """
        path = Path(path)
        fields = {
            "name": name,
            "arch": arch,
            "visibility": visibility,
            "num_classes": num_classes,
            "sigma": sigma,
            "input_shape": None
            if input_shape is None
            else json.dumps([int(d) for d in input_shape]),
            "class_names": None if class_names is None else json.dumps(list(class_names)),
            "normalization": normalization
            if normalization is None or isinstance(normalization, str)
            else json.dumps(normalization),
        }
        form = {k: str(v) for k, v in fields.items() if v is not None}
        with _open(path) as f:
            return self._request(
                "POST",
                "/v1/models",
                data=form,
                files={"file": (path.name, f)},
                timeout=self.upload_timeout,
            ).json()

    def register_pipeline(
        self,
        denoiser_id: str,
        classifier_id: str,
        *,
        name: str | None = None,
        visibility: str | None = None,
    ) -> dict:
        """Register an uploaded denoiser followed by an uploaded classifier as one model (a key
        with the ``models`` scope); its record once a worker checked that the two parts fit."""
        body = {
            "denoiser": denoiser_id,
            "classifier": classifier_id,
            **({"name": name} if name else {}),
            **({"visibility": visibility} if visibility else {}),
        }
        return self._request(
            "POST", "/v1/models/pipelines", json=body, timeout=self.upload_timeout
        ).json()

    def list_models(self) -> list[dict]:
        """The ready models this key may use (its account's and the public ones), oldest first."""
        return self._request("GET", "/v1/models").json()

    def set_model_visibility(self, model_id: str, visibility: str) -> dict:
        """Make a model of this key's account "public" or "private"; its record."""
        return self._request(
            "PATCH", f"/v1/models/{_segment(model_id)}", json={"visibility": visibility}
        ).json()

    def get_model(self, model_id: str) -> dict:
        return self._request("GET", f"/v1/models/{_segment(model_id)}").json()

    def download_model(self, model_id: str, path: str | Path) -> dict:
        """Write the model's stored file to ``path`` (a file, or a folder that gets the server's
        file name) and check it against the SHA-256 the server names; ``{path, sha256,
        size_bytes, filename}``. A mismatch or a broken transfer leaves no file and raises
        ClientError. A pipeline has no file (409 names its parts)."""
        target = Path(path)
        route = f"/v1/models/{_segment(model_id)}/file"
        try:
            with self._http.stream("GET", route, timeout=self.upload_timeout) as resp:
                if not resp.is_success:
                    resp.read()
                    self._check(resp, "GET", route)
                expected = resp.headers.get("X-Model-SHA256", "").lower()
                filename = _attachment_name(resp.headers.get("Content-Disposition"), model_id)
                if target.is_dir():
                    target = target / filename
                partial = target.with_name(f".{target.name}.part")
                digest, size = hashlib.sha256(), 0
                try:
                    with open(partial, "wb") as f:
                        for block in resp.iter_bytes(1 << 20):
                            digest.update(block)
                            size += len(block)
                            f.write(block)
                    if not expected or digest.hexdigest() != expected:
                        raise ClientError(
                            f"model {model_id}: the downloaded bytes have sha256 "
                            f"{digest.hexdigest()}, the server names {expected or 'none'}; "
                            "nothing was written"
                        )
                    partial.replace(target)
                finally:
                    partial.unlink(missing_ok=True)
        except OSError as exc:
            raise ClientError(f"cannot write {target}: {exc.strerror or exc}") from None
        except httpx.HTTPError as exc:
            raise ClientError(f"GET {self.base_url}{route} failed: {exc}") from None
        return {"path": str(target), "sha256": expected, "size_bytes": size, "filename": filename}

    def delete_model(self, model_id: str) -> None:
        """Remove a model of this key's account (the admin key: any model)."""
        self._request("DELETE", f"/v1/models/{_segment(model_id)}")

    # -- training -----------------------------------------------------------------------------

    def submit_train(self, dataset: str = "digits", **options: Any) -> dict:
        """Queue the training of a classifier (a key with the ``train`` scope) on ``dataset``
        ("digits", built in, or an uploaded dataset's id); ``{job_id, status, location}``.

        ``options`` are ``POST /v1/train``'s fields (arch, method, sigma, epochs, batch_size, lr,
        optimizer, m, epsilon, steps, warmup_epochs, seed, name); those left out or None take
        the server's defaults. :meth:`wait` with ``unit="epochs"`` follows it; the succeeded
        record's ``result.model_id`` names the trained model."""
        body = {"dataset": dataset, **{k: v for k, v in options.items() if v is not None}}
        return self._submit("/v1/train", lambda: {"json": body}).json()

    def submit_train_denoiser(self, dataset: str = "digits", **options: Any) -> dict:
        """Queue the training of a denoiser (``POST /v1/train/denoiser``: objective, classifier,
        init, sigma, epochs, batch_size, lr, depth, width, seed, name); as :meth:`submit_train`."""
        body = {"dataset": dataset, **{k: v for k, v in options.items() if v is not None}}
        return self._submit("/v1/train/denoiser", lambda: {"json": body}).json()

    # -- datasets -----------------------------------------------------------------------------

    def upload_dataset(self, path: str | Path, name: str | None = None) -> dict:
        """Upload an ``.npz`` with ``x`` (N, C, H, W) and ``y`` (N labels); its record (``id``)."""
        path = Path(path)
        with _open(path) as f:

            def attempt() -> dict[str, Any]:
                f.seek(0)  # a retry sends the whole file again
                return {
                    "data": {"name": name} if name else {},
                    "files": {"file": (path.name, f)},
                    "timeout": self.upload_timeout,
                }

            return self._submit("/v1/datasets", attempt).json()

    def list_datasets(self) -> list[dict]:
        """Every dataset, newest first (every page of ``GET /v1/datasets``)."""
        datasets: list[dict] = []
        params: dict[str, Any] = {"limit": 100}
        while True:
            page = self._request("GET", "/v1/datasets", params=params).json()
            datasets.extend(page["datasets"])
            if page["next_cursor"] is None:
                return datasets
            params["cursor"] = page["next_cursor"]

    def delete_dataset(self, dataset_id: str) -> None:
        self._request("DELETE", f"/v1/datasets/{_segment(dataset_id)}")

    # -- transport ----------------------------------------------------------------------------

    # -- accounts and keys -------------------------------------------------------------------

    def create_key(
        self,
        account: str,
        scopes: Sequence[str],
        name: str | None = None,
        expires_in_s: int | None = None,
    ) -> dict:
        """A new key of ``account`` with ``scopes`` (admin key): its record and, under ``key``,
        the key itself, which the service shows this once."""
        body: dict[str, Any] = {"account": account, "scopes": list(scopes)}
        if name is not None:
            body["name"] = name
        if expires_in_s is not None:
            body["expires_in_s"] = expires_in_s
        return self._request("POST", "/v1/keys", json=body).json()

    def list_keys(self) -> list[dict]:
        """The keys this key may see (the admin every key, others their account's); no secrets."""
        return self._request("GET", "/v1/keys").json()["keys"]

    def revoke_key(self, key_id: str) -> None:
        """Revoke a key (the admin key, or a key of the same account)."""
        self._request("DELETE", f"/v1/keys/{_segment(key_id)}")

    def whoami(self) -> dict:
        """This key's account, key id, scopes and whether it is an admin."""
        return self._request("GET", "/v1/whoami").json()

    def _submit(self, path: str, attempt: Callable[[], dict[str, Any]]) -> httpx.Response:
        """POST ``attempt()``'s request under one Idempotency-Key, again after a refusal with
        Retry-After or a failed connection, up to ``retries`` more times."""
        headers = {"Idempotency-Key": str(uuid.uuid4())}
        for tries_left in range(self.retries, -1, -1):
            try:
                return self._request("POST", path, headers=headers, **attempt())
            except ClientError as exc:
                wait_s = self._retry_wait(exc)
                if tries_left == 0 or wait_s is None:
                    raise
                print(f"smoothcert: {exc}; retrying in {wait_s:g} s", file=sys.stderr)
                time.sleep(wait_s)
        raise AssertionError("unreachable")

    def _retry_wait(self, exc: ClientError) -> float | None:
        """Seconds to wait before trying ``exc``'s request again, or None when it must not be."""
        if exc.answer_lost:
            return 1.0  # the same key makes sending it again safe
        if exc.status_code not in RETRY_STATUS or exc.retry_after is None:
            return None  # not one to retry, or no Retry-After (not the API's: a proxy's)
        return exc.retry_after if exc.retry_after <= self.max_retry_wait_s else None

    def _request(self, method: str, path: str, **kwargs) -> httpx.Response:
        try:
            resp = self._http.request(method, path, **kwargs)
        except httpx.ConnectError as exc:
            raise ClientError(
                f"cannot connect to the smoothcert service at {self.base_url} ({exc}); "
                "is it running?"
            ) from None
        except httpx.TimeoutException:
            raise ClientError(
                f"no answer from {self.base_url} to {method} {path} in time", answer_lost=True
            ) from None
        except httpx.TransportError as exc:
            raise ClientError(
                f"{method} {self.base_url}{path} failed: {exc}", answer_lost=True
            ) from None
        except httpx.HTTPError as exc:
            raise ClientError(f"{method} {self.base_url}{path} failed: {exc}") from None
        return self._check(resp, method, path)

    @staticmethod
    def _check(resp: httpx.Response, method: str, path: str) -> httpx.Response:
        """``resp`` when it succeeded; otherwise the ClientError that says why."""
        if resp.is_success:
            return resp
        try:
            detail = resp.json()["detail"]
        except (ValueError, KeyError, TypeError):
            detail = resp.text[:300] or resp.reason_phrase
        raise ClientError(
            f"{method} {path}: {resp.status_code} {resp.reason_phrase}: {_detail_text(detail)}",
            status_code=resp.status_code,
            detail=detail,
            retry_after=_seconds(resp.headers.get("Retry-After")),
        )


def _seconds(value: str | None) -> float | None:
    """A ``Retry-After`` given in seconds (the form this API sends); None otherwise."""
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def finished(answer: dict) -> bool:
    """Whether a submission's answer is the finished job's record (a ``wait_s`` that the job
    ended within), not the acceptance ``{job_id, status, location}``."""
    return "kind" in answer and answer.get("status") in TERMINAL


def _attachment_name(disposition: str | None, model_id: str) -> str:
    """The file name a ``Content-Disposition`` suggests, as a bare name (no folders, never hidden);
    ``<model_id>`` when it names none."""
    name = ""
    for part in (disposition or "").split(";"):
        key, _, value = part.strip().partition("=")
        if key.lower() == "filename*" and value.lower().startswith("utf-8''"):
            name = unquote(value[7:])
            break
        if key.lower() == "filename":
            name = value.strip('"')
    name = Path(name.replace("\\", "/")).name.lstrip(".")
    return name or _segment(model_id)


def _segment(identifier: str) -> str:
    """An id as one URL path segment, so that a stray "/" or "?" cannot address another route."""
    return quote(identifier, safe="")


def _read(path: Path) -> bytes:
    with _open(path) as f:
        return f.read()


def _open(path: Path):
    try:
        return open(path, "rb")
    except OSError as exc:
        raise ClientError(f"cannot read {path}: {exc.strerror or exc}") from None
