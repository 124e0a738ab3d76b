"""The data dir holds every key's datasets, models and inputs: the API creates it 0700 (and narrows
an existing one of its user to that), and what it writes there is its user's only."""

from __future__ import annotations

import io
import os
import stat

import httpx
import numpy as np

from smoothcert.service.core.store import private_data_dir
from tests.support.stack import USER_KEY, stack_env, start_api, stop_process, upload_dataset


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_the_api_makes_the_data_dir_0700_and_writes_files_for_its_user_only(redis_url, tmp_path):
    data = tmp_path / "fresh" / "data"  # not there yet: the API makes it
    proc, url = start_api(stack_env(redis_url, data), tmp_path / "api.log")
    try:
        assert data.is_dir() and mode(data) == 0o700
        buf = io.BytesIO()
        np.savez(buf, x=np.zeros((2, 1, 8, 8), dtype=np.uint8), y=np.zeros(2, dtype=np.int64))
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {USER_KEY}"}) as client:
            resp = upload_dataset(client, buf.getvalue())
            assert resp.status_code == 201, resp.text
            folder = data / "datasets" / resp.json()["id"]
            written = [data / "datasets", folder, *folder.iterdir()]
            assert {p.name for p in folder.iterdir()} == {"x.npy", "y.npy", "meta.json"}
            assert {p.name: mode(p) & 0o077 for p in written} == {p.name: 0 for p in written}
            assert client.delete(f"/v1/datasets/{resp.json()['id']}").status_code == 204
    finally:
        stop_process(proc)


def test_an_existing_data_dir_of_this_user_is_narrowed_to_0700(tmp_path):
    data = tmp_path / "data"
    data.mkdir(mode=0o755)
    os.chmod(data, 0o755)
    before = os.umask(0o022)
    try:
        assert private_data_dir(data) == data and mode(data) == 0o700
        (data / "written").write_text("secret")
        assert mode(data / "written") == 0o600
    finally:
        os.umask(before)
