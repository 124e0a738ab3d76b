"""The `smoothcert` subcommands that talk to a running service over HTTP.

`submit`, `status`, `wait`, `cancel`, `models upload|list|delete|download`,
`datasets upload|list|delete`, `keys create|list|revoke`, `whoami`, and `train` / `train-denoiser`
with ``--url`` (:func:`add_training_options`, :func:`run_training`) call the API v1 through
:class:`~smoothcert.service.client.service_client.ServiceClient`. Where: ``--url``, else
``SMOOTHCERT_URL``, else ``http://127.0.0.1:$SMOOTHCERT_PORT`` (port 8000 by default). Who:
``--api-key``, else ``SMOOTHCERT_API_KEY``; uploading and deleting models and the `keys`
commands use ``SMOOTHCERT_ADMIN_KEY`` when it is set. Ids and TSV go to stdout, summaries and
progress to stderr, so the output pipes; errors are ClientError (a ValueError) and end as one
line with exit status 2 in cli.main.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from smoothcert.service.cli import options
from smoothcert.service.core.model_store import VISIBILITIES
from smoothcert.service.core.params import MODES

ENV_URL, ENV_KEY, ENV_ADMIN_KEY = "SMOOTHCERT_URL", "SMOOTHCERT_API_KEY", "SMOOTHCERT_ADMIN_KEY"


def add_commands(commands: argparse._SubParsersAction) -> None:
    """Register the HTTP subcommands on the `smoothcert` parser's subcommand list."""
    connection = argparse.ArgumentParser(add_help=False)
    where = connection.add_argument_group("service")
    where.add_argument(
        "--url", help=f"the API's base URL (default ${ENV_URL}, else http://127.0.0.1:8000)"
    )
    where.add_argument(
        "--api-key", help=f"bearer key (default ${ENV_KEY}; model upload/delete: ${ENV_ADMIN_KEY})"
    )

    submit = commands.add_parser(
        "submit",
        parents=[connection],
        help="queue a certify or predict job on the service; prints the job id",
    )
    submit.add_argument(
        "model_id", metavar="MODEL_ID", help="a model id from `smoothcert models list`"
    )
    source = submit.add_mutually_exclusive_group(required=True)
    options.add_inputs(source, required=False)
    source.add_argument(
        "--dataset", metavar="ID", help="a dataset id from `smoothcert datasets upload`"
    )
    options.add_labels(submit, local=False)
    submit.add_argument("--skip", type=int, help="with --dataset: start at this input (default 0)")
    submit.add_argument(
        "--limit", type=int, help="with --dataset: certify at most this many inputs"
    )
    options.add_sigma(submit)
    submit.add_argument("--mode", choices=MODES, default="certify", help="default certify")
    options.add_samples(submit, local=False)
    options.add_run_options(submit, local=False)
    options.add_certify_options(submit, local=False)
    options.add_runtime(submit, local=False)
    options.add_precision(submit, local=False)
    options.add_noise(submit, local=False)
    submit.add_argument("--wait", action="store_true", help="wait for the result and write its TSV")
    submit.add_argument(
        "--wait-s",
        type=float,
        metavar="S",
        help="the server holds its answer until the job ends, at most S seconds (at most 30): "
        "the TSV is written when it ended, else the job id is printed (with --wait: followed)",
    )
    _result_options(submit)
    submit.set_defaults(handler=_submit)

    status = commands.add_parser(
        "status", parents=[connection], help="show a job's status and progress"
    )
    status.add_argument("job_id", metavar="JOB_ID")
    status.add_argument("--json", action="store_true", help="print the whole job record as JSON")
    status.set_defaults(handler=_status)

    wait = commands.add_parser(
        "wait", parents=[connection], help="wait for a job and write its results TSV"
    )
    wait.add_argument("job_id", metavar="JOB_ID")
    _result_options(wait)
    wait.set_defaults(handler=_wait)

    cancel = commands.add_parser(
        "cancel", parents=[connection], help="cancel a queued or running job"
    )
    cancel.add_argument("job_id", metavar="JOB_ID")
    cancel.set_defaults(handler=_cancel)

    models = commands.add_parser("models", help="upload, list and delete the service's models")
    actions = models.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    upload = actions.add_parser(
        "upload", parents=[connection], help="upload a model (admin key); prints its id"
    )
    upload.add_argument("file", metavar="FILE", help="an .onnx file, or a .safetensors file")
    upload.add_argument("--name")
    options.add_model_fields(upload, local=False)
    upload.add_argument("--sigma", type=float, help="the noise level the model was trained with")
    upload.add_argument("--class-names", help="comma-separated, or a JSON list")
    upload.add_argument(
        "--visibility",
        choices=VISIBILITIES,
        help="private (the default): only this key's account may use it; public: every account",
    )
    upload.add_argument(
        "--json", action="store_true", help="print the model record as JSON instead of its id"
    )
    upload.set_defaults(handler=_upload, admin=True)
    pipeline = actions.add_parser(
        "pipeline",
        parents=[connection],
        help="register an uploaded denoiser and classifier as one model (admin key); prints its id",
    )
    pipeline.add_argument(
        "--denoiser", required=True, metavar="ID", help="id of an uploaded denoiser"
    )
    pipeline.add_argument(
        "--classifier", required=True, metavar="ID", help="id of an uploaded classifier"
    )
    pipeline.add_argument("--name", help='default "DENOISER + CLASSIFIER"')
    pipeline.add_argument(
        "--visibility", choices=VISIBILITIES, help="private (the default) or public"
    )
    pipeline.add_argument(
        "--json", action="store_true", help="print the model record as JSON instead of its id"
    )
    pipeline.set_defaults(handler=_register_pipeline, admin=True)
    listing = actions.add_parser("list", parents=[connection], help="list the ready models")
    listing.add_argument("--json", action="store_true", help="print the records as JSON")
    listing.set_defaults(handler=_list_models)
    delete = actions.add_parser(
        "delete", parents=[connection], help="delete a model of this key's account"
    )
    delete.add_argument("model_id", metavar="ID")
    delete.set_defaults(handler=_delete_model, admin=True)
    visibility = actions.add_parser(
        "visibility",
        parents=[connection],
        help="make a model of this key's account public (every account may use it) or private",
    )
    visibility.add_argument("model_id", metavar="ID")
    visibility.add_argument("visibility", choices=VISIBILITIES)
    visibility.set_defaults(handler=_set_visibility, admin=True)
    download = actions.add_parser(
        "download",
        parents=[connection],
        help="download a model's stored file (.onnx or .safetensors) and check its sha256",
    )
    download.add_argument("model_id", metavar="ID")
    download.add_argument(
        "--out",
        metavar="FILE",
        help="where to write it (default: its uploaded file name in the current folder; a "
        "folder: that name in it)",
    )
    download.set_defaults(handler=_download_model)

    datasets = commands.add_parser(
        "datasets", help="upload, list and delete datasets to certify as one job"
    )
    actions = datasets.add_subparsers(dest="datasets_command", required=True, metavar="ACTION")
    upload = actions.add_parser(
        "upload", parents=[connection], help="upload an .npz with x and y; prints its id"
    )
    upload.add_argument(
        "file", metavar="FILE", help="numpy.savez file: x (N,C,H,W) in [0,1] or uint8, y labels"
    )
    upload.add_argument("--name")
    upload.set_defaults(handler=_upload_dataset)
    listing = actions.add_parser("list", parents=[connection], help="list the datasets")
    listing.add_argument("--json", action="store_true", help="print the records as JSON")
    listing.set_defaults(handler=_list_datasets)
    delete = actions.add_parser("delete", parents=[connection], help="delete a dataset")
    delete.add_argument("dataset_id", metavar="ID")
    delete.set_defaults(handler=_delete_dataset)

    keys = commands.add_parser("keys", help="create, list and revoke API keys of accounts")
    actions = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    create = actions.add_parser(
        "create",
        parents=[connection],
        help="create a key of an account (admin key); prints the key, shown this once",
    )
    create.add_argument(
        "account", metavar="ACCOUNT", help="the account (created with its first key)"
    )
    create.add_argument(
        "--scopes",
        default="certify",
        metavar="LIST",
        help="comma-separated: certify, models, train, admin (default: certify)",
    )
    create.add_argument("--name", help="a label for people: where the key is used")
    create.add_argument(
        "--expires-in", type=int, metavar="S", help="the key expires after S seconds"
    )
    create.set_defaults(handler=_create_key, admin=True)
    listing = actions.add_parser(
        "list", parents=[connection], help="list the keys (admin: all; others: their account's)"
    )
    listing.add_argument("--json", action="store_true", help="print the records as JSON")
    listing.set_defaults(handler=_list_keys, admin=True)
    revoke = actions.add_parser(
        "revoke", parents=[connection], help="revoke a key: refused from then on"
    )
    revoke.add_argument("key_id", metavar="ID")
    revoke.set_defaults(handler=_revoke_key, admin=True)
    whoami = commands.add_parser(
        "whoami", parents=[connection], help="the account, key id and scopes of the key in use"
    )
    whoami.set_defaults(handler=_whoami)


def _result_options(p: argparse.ArgumentParser) -> None:
    options.add_out(p, local=False)
    p.add_argument(
        "--timeout", type=float, metavar="S", help="stop waiting after S seconds (the job goes on)"
    )


def service_client(args: argparse.Namespace):
    """A ServiceClient for the URL and key that the options and environment name."""
    from smoothcert.service.client.service_client import ClientError, ServiceClient

    url = (
        args.url
        or os.environ.get(ENV_URL)
        or f"http://127.0.0.1:{os.environ.get('SMOOTHCERT_PORT') or 8000}"
    )
    key = (
        args.api_key
        or (getattr(args, "admin", False) and os.environ.get(ENV_ADMIN_KEY))
        or os.environ.get(ENV_KEY)
    )
    if not key:
        raise ClientError(
            f"no API key: set {ENV_KEY} (`smoothcert up` prints it) or pass --api-key"
        )
    return ServiceClient(url, key)


def _submit(args) -> int:
    from smoothcert.service.client.service_client import finished

    if args.wait_s is not None and not 0 < args.wait_s <= 30:
        raise ValueError(f"--wait-s must be in (0, 30] seconds, got {args.wait_s:g}")
    if args.dataset and args.labels:
        raise ValueError("a dataset job takes its labels from the dataset's y; drop --labels")
    if args.inputs and (args.skip is not None or args.limit is not None):
        raise ValueError("--skip and --limit go with --dataset")
    options.check_bounds(args, certify=args.mode == "certify" and args.target_radius is None)
    labels = _read_labels(args.labels, args.inputs) if args.labels else None
    with service_client(args) as client:
        accepted = client.submit_job(
            options.certify_params(args, args.model_id),
            args.inputs,
            labels=labels,
            dataset_id=args.dataset,
            skip=args.skip,
            limit=args.limit,
            wait_s=args.wait_s,
        )
        if finished(accepted):  # it ended within --wait-s: the answer is its record
            return _finish(client, accepted, args)
        job_id = accepted["job_id"]
        if not args.wait:
            if args.wait_s is not None:
                print(
                    f"job {job_id} is still {accepted['status']} after {args.wait_s:g} s; "
                    f"`smoothcert wait {job_id}` follows it",
                    file=sys.stderr,
                )
            print(job_id)
            return 0
        print(f"submitted job {job_id}", file=sys.stderr)
        return _follow(client, job_id, args)


def _wait(args) -> int:
    with service_client(args) as client:
        return _follow(client, args.job_id, args)


def _follow(client, job_id: str, args) -> int:
    """Wait for the job; write its TSV (or its JSON result) and a summary, or fail in one line."""

    try:
        record = client.wait(job_id, timeout=args.timeout)
    except KeyboardInterrupt:
        print(
            f"smoothcert: stopped waiting; job {job_id} keeps running (`smoothcert cancel {job_id}` stops it)",
            file=sys.stderr,
        )
        return 130
    return _finish(client, record, args)


def _finish(client, record: dict, args) -> int:
    """Write an ended job's TSV (or its JSON result) and a summary, or fail in one line."""
    from smoothcert.service.client.service_client import ClientError

    job_id = record["id"]
    if record["status"] != "succeeded":
        raise ClientError(
            f"job {job_id} {record['status']}"
            + (f": {record['error']}" if record.get("error") else "")
        )
    result = record.get("result") or {}
    if "results" not in result:  # a job without per-input rows (a model check)
        options.write_out(json.dumps(result, indent=2) + "\n", args.out)
        return 0
    options.write_out(client.results_tsv(job_id), args.out, result.get("provenance"))
    print(_summary(record), file=sys.stderr)
    return 0


def _summary(record: dict) -> str:
    rows = record["result"]["results"]
    answered = sum(r["prediction"] is not None for r in rows)
    labelled = bool(rows) and rows[0].get("label") is not None
    correct = f", {sum(r['prediction'] == r['label'] for r in rows)} correct" if labelled else ""
    took = ""
    if record.get("started_at") and record.get("finished_at"):
        took = f" in {record['finished_at'] - record['started_at']:.1f} s"
    if record["kind"] == "predict":
        return f"predicted {answered} of {len(rows)} inputs{correct}{took}"
    return f"certified {answered} of {len(rows)} inputs ({len(rows) - answered} abstained){correct}{took}"


def _status(args) -> int:
    with service_client(args) as client:
        record = client.status(args.job_id)
    if args.json:
        print(json.dumps(record, indent=2))
        return 0
    progress = record["progress"]
    done, total = progress["done"], progress["total"]
    unit = {"inputs": "inputs settled"}.get(progress.get("unit"), progress.get("unit", "samples"))
    share = f" ({100 * done / total:.0f}%)" if total else ""
    line = f"{record['id']}\t{record['kind']}\t{record['status']}\t{done}/{total} {unit}{share}"
    if record.get("cancel_requested") and record["status"] not in (
        "canceled",
        "succeeded",
        "failed",
    ):
        line += "\tcancel requested"
    if record.get("error"):
        line += f"\terror: {record['error']}"
    print(line)
    return 0


def _cancel(args) -> int:
    with service_client(args) as client:
        record = client.cancel(args.job_id)
    what = (
        "canceled"
        if record["status"] == "canceled"
        else "cancel requested; it stops between two batches"
    )
    print(f"job {record['id']}: {what}", file=sys.stderr)
    return 0


def _upload(args) -> int:
    shape = None
    if args.input_shape:
        try:
            shape = [int(v) for v in args.input_shape.strip("[]() ").split(",")]
        except ValueError:
            raise ValueError(
                f"--input-shape must look like 3,32,32, got {args.input_shape!r}"
            ) from None
    names = None
    if args.class_names:
        text = args.class_names.strip()
        names = json.loads(text) if text.startswith("[") else [n.strip() for n in text.split(",")]
    with service_client(args) as client:
        model = client.upload_model(
            args.file,
            name=args.name,
            arch=args.arch,
            input_shape=shape,
            num_classes=args.num_classes,
            normalization=args.normalization,
            sigma=args.sigma,
            class_names=names,
            visibility=args.visibility,
        )
    if args.json:
        print(json.dumps(model, indent=2))
        return 0
    print(model["id"])
    print(
        f"uploaded {model.get('name') or Path(args.file).name}: {model['format']}, input {model['input_shape']}, "
        f"{model['num_classes']} classes, sha256 {model['sha256'][:12]}",
        file=sys.stderr,
    )
    return 0


def _register_pipeline(args) -> int:
    with service_client(args) as client:
        model = client.register_pipeline(
            args.denoiser, args.classifier, name=args.name, visibility=args.visibility
        )
    if args.json:
        print(json.dumps(model, indent=2))
        return 0
    print(model["id"])
    print(
        f"registered {model.get('name')}: denoiser {args.denoiser} then classifier {args.classifier}, "
        f"input {model['input_shape']}, {model['num_classes']} classes, sha256 {model['sha256'][:12]}",
        file=sys.stderr,
    )
    return 0


def _list_models(args) -> int:
    with service_client(args) as client:
        models = client.list_models()
    columns = ("id", "name", "owner", "visibility", "format", "arch", "input_shape", "num_classes")
    _table(args, models, (*columns, "sigma"))
    return 0


def _set_visibility(args) -> int:
    with service_client(args) as client:
        model = client.set_model_visibility(args.model_id, args.visibility)
    print(f"model {model['id']} is {model['visibility']}", file=sys.stderr)
    return 0


def _download_model(args) -> int:
    with service_client(args) as client:
        got = client.download_model(args.model_id, args.out or ".")
    print(got["path"])
    print(
        f"downloaded model {args.model_id}: {got['size_bytes']} bytes, sha256 {got['sha256']} "
        "(checked)",
        file=sys.stderr,
    )
    return 0


def _delete_model(args) -> int:
    with service_client(args) as client:
        client.delete_model(args.model_id)
    print(f"deleted model {args.model_id}", file=sys.stderr)
    return 0


def _upload_dataset(args) -> int:
    with service_client(args) as client:
        dataset = client.upload_dataset(args.file, name=args.name)
    print(dataset["id"])
    print(
        f"uploaded {dataset['name']}: {dataset['num_inputs']} inputs of shape {dataset['input_shape']}, "
        f"labels {dataset['label_range'][0]}..{dataset['label_range'][1]}",
        file=sys.stderr,
    )
    return 0


def _list_datasets(args) -> int:
    with service_client(args) as client:
        datasets = client.list_datasets()
    _table(args, datasets, ("id", "name", "num_inputs", "input_shape", "label_range"))
    return 0


def _delete_dataset(args) -> int:
    with service_client(args) as client:
        client.delete_dataset(args.dataset_id)
    print(f"deleted dataset {args.dataset_id}", file=sys.stderr)
    return 0


def _create_key(args) -> int:
    scopes = [s.strip() for s in args.scopes.split(",") if s.strip()]
    with service_client(args) as client:
        key = client.create_key(args.account, scopes, name=args.name, expires_in_s=args.expires_in)
    print(key["key"])
    expires = f", expires {key['expires_time']}" if key["expires_time"] else ""
    print(
        f"created key {key['id']} of account {key['account']} with scopes "
        f"{','.join(key['scopes'])}{expires}; it is shown only now",
        file=sys.stderr,
    )
    return 0


def _list_keys(args) -> int:
    with service_client(args) as client:
        keys = client.list_keys()
    _table(args, keys, ("id", "account", "scopes", "name", "created_time", "expires_time"))
    return 0


def _revoke_key(args) -> int:
    with service_client(args) as client:
        client.revoke_key(args.key_id)
    print(f"revoked key {args.key_id}", file=sys.stderr)
    return 0


def _whoami(args) -> int:
    with service_client(args) as client:
        print(json.dumps(client.whoami()))
    return 0


# --- `smoothcert train|train-denoiser --url`: training on the service --------------------------

# The options of the local commands that POST /v1/train and POST /v1/train/denoiser take.
TRAIN_FIELDS = {
    "train": (
        "arch",
        "method",
        "sigma",
        "epochs",
        "batch_size",
        "lr",
        "optimizer",
        "m",
        "epsilon",
        "steps",
        "warmup_epochs",
        "seed",
        "name",
    ),
    "train-denoiser": (
        "objective",
        "classifier",
        "init",
        "sigma",
        "epochs",
        "mse_epochs",
        "batch_size",
        "lr",
        "depth",
        "width",
        "seed",
        "name",
    ),
}
_LOCAL_ONLY = ("checkpoint_dir",)  # the service keeps the job's checkpoint itself


def add_training_options(p: argparse.ArgumentParser) -> None:
    """``--url``, ``--api-key``, ``--wait`` and ``--timeout`` of a training command: with
    ``--url`` it runs on the service (:func:`run_training`) instead of in this process."""
    group = p.add_argument_group(
        "on the service (with --url: --dataset is digits or an uploaded dataset's id, "
        "--classifier and --init are model ids; --device and --checkpoint-dir do not apply)"
    )
    group.add_argument(
        "--url",
        help=f"train on the service at this base URL (${ENV_URL} does not choose it: "
        "without --url the command trains here); prints the job id",
    )
    group.add_argument(
        "--api-key",
        help=f"bearer key with the train scope (default ${ENV_ADMIN_KEY}, else ${ENV_KEY})",
    )
    group.add_argument(
        "--wait",
        action="store_true",
        help="follow the epochs and print the trained model's id (with --out: also download it "
        "there)",
    )
    group.add_argument(
        "--timeout", type=float, metavar="S", help="with --wait: stop after S s (the job goes on)"
    )


def run_training(args: argparse.Namespace, command: str) -> int:
    """`smoothcert train|train-denoiser --url URL ...`: submit the job; print its id, or with
    ``--wait`` follow its epochs and print the trained model's id."""
    from smoothcert.service.client.service_client import ClientError

    given = [f for f in _LOCAL_ONLY if getattr(args, f, None)]
    if getattr(args, "device", None) not in (None, "auto", "cpu"):
        given.append("device")
    if given:
        flags = ", ".join("--" + f.replace("_", "-") for f in given)
        raise ValueError(f"{flags}: not with --url (the service's trainer chooses its own)")
    if args.out and not args.wait:
        raise ValueError("--out with --url needs --wait: the model is downloaded once trained")
    if args.timeout is not None and not args.wait:
        raise ValueError("--timeout goes with --wait")
    fields = {k: getattr(args, k, None) for k in TRAIN_FIELDS[command]}
    args.admin = True  # the admin key of the environment, when set, may train
    with service_client(args) as client:
        submit = client.submit_train if command == "train" else client.submit_train_denoiser
        job_id = submit(args.dataset, **fields)["job_id"]
        if not args.wait:
            print(job_id)
            return 0
        print(f"submitted training job {job_id}", file=sys.stderr)
        try:
            record = client.wait(job_id, timeout=args.timeout, unit="epochs", max_poll_s=1.0)
        except KeyboardInterrupt:
            print(
                f"smoothcert: stopped waiting; job {job_id} keeps running "
                f"(`smoothcert cancel {job_id}` stops it)",
                file=sys.stderr,
            )
            return 130
        if record["status"] != "succeeded":
            raise ClientError(
                f"training job {job_id} {record['status']}"
                + (f": {record['error']}" if record.get("error") else "")
            )
        result = record.get("result") or {}
        model_id = result["model_id"]
        print(f"{_trained(command, record)}; model {model_id}", file=sys.stderr)
        print(model_id)
        if args.out:
            got = client.download_model(model_id, args.out)
            print(f"wrote {got['path']} (sha256 {got['sha256']}, checked)", file=sys.stderr)
    return 0


def _trained(command: str, record: dict) -> str:
    """One line on a succeeded training job: what was trained, its epochs and last metrics."""
    params, result = record.get("params") or {}, record.get("result") or {}
    metrics = result.get("metrics") or {}  # params: the job's training configuration, flat
    what = "denoiser" if command == "train-denoiser" else params.get("arch") or "model"
    shown = [
        f"{k} {v:.4f}"
        for k, v in metrics.items()
        if isinstance(v, float) and ("loss" in k or "accuracy" in k or "mse" in k)
    ]
    epochs = record.get("progress", {}).get("done")
    return f"trained {what} for {epochs} epochs" + (f": {', '.join(shown)}" if shown else "")


def _table(args, records: list[dict], columns: tuple[str, ...]) -> None:
    """Records as JSON (--json) or as TSV with ``columns``; lists joined by commas, "-" for none."""
    if args.json:
        print(json.dumps(records, indent=2))
        return
    print("\t".join(columns))
    for record in records:
        values = [record.get(c) for c in columns]
        print(
            "\t".join(
                "-" if v is None else ",".join(map(str, v)) if isinstance(v, list) else str(v)
                for v in values
            )
        )


def _read_labels(path: str, inputs: list[str]) -> list[int]:
    """Labels checked against the number of inputs before anything is sent."""
    from smoothcert.service.core.inputs import image_files, load_labels, load_npy

    if len(inputs) == 1 and inputs[0].lower().endswith(".npy"):
        x = load_npy(inputs[0])
        count = 1 if x.ndim == 3 else len(x)
    else:
        count = len(image_files(inputs))
    return load_labels(path, count).tolist()
