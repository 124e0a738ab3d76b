"""GET /v1/datasets page by page, and the most datasets one key may keep, on real processes.

The module's API shares the session's Redis and data folder (so its listing holds every dataset
the session stored), with keys of its own and SMOOTHCERT_MAX_DATASETS_PER_KEY = MOST.
"""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import pytest

from tests.support.stack import account_key, stack_env, start_api, stop_process, upload_dataset

USER, ADMIN = "dataset-listing", "listing-admin-key-0123456789"  # an account of its own
MOST = 2


def npz(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


TINY = npz(x=np.zeros((1, 1, 8, 8), dtype=np.uint8), y=np.zeros(1, dtype=np.int64))


@pytest.fixture(scope="module")
def listing(redis_url, data_dir):
    """User and admin clients of an API where a key keeps at most MOST datasets."""
    env = stack_env(
        redis_url,
        data_dir,
        SMOOTHCERT_ADMIN_KEY=ADMIN,
        SMOOTHCERT_MAX_DATASETS_PER_KEY=str(MOST),
    )
    proc, url = start_api(env, data_dir / "api-dataset-listing.log")
    with (
        httpx.Client(
            base_url=url, headers={"Authorization": f"Bearer {account_key(url, ADMIN, USER)}"}
        ) as user,
        httpx.Client(base_url=url, headers={"Authorization": f"Bearer {ADMIN}"}) as admin,
    ):
        yield {"user": user, "admin": admin}
    stop_process(proc)


def test_a_key_keeps_at_most_its_datasets_and_the_list_comes_in_pages(listing):
    user, admin = listing["user"], listing["admin"]
    mine = [upload_dataset(user, TINY, f"mine-{i}.npz") for i in range(MOST)]
    assert [r.status_code for r in mine] == [201] * MOST, mine[-1].text
    refused = upload_dataset(user, TINY, "one-too-many.npz")
    assert refused.status_code == 413, refused.text
    detail = refused.json()["detail"]
    assert f"already has {MOST} datasets" in detail and "SMOOTHCERT_MAX_DATASETS_PER_KEY" in detail
    theirs = upload_dataset(admin, TINY, "theirs.npz")  # another key has places of its own
    assert theirs.status_code == 201, theirs.text

    # The account's own datasets, newest first, one a page; the cursor leads on from the last of
    # a page. The admin's dataset is not among them; the admin's listing has every dataset.
    uploaded = [r.json()["id"] for r in reversed(mine)]
    first = user.get("/v1/datasets", params={"limit": 1}).json()
    assert [d["id"] for d in first["datasets"]] == uploaded[:1] and first["next_cursor"]
    second = user.get("/v1/datasets", params={"limit": 1, "cursor": first["next_cursor"]}).json()
    assert second["datasets"][0]["id"] == uploaded[1]
    assert second["datasets"][0] == user.get(f"/v1/datasets/{uploaded[1]}").json()

    def every(client: httpx.Client) -> list[str]:
        seen: list[str] = []  # every page, to the end
        params: dict[str, int | str] = {"limit": 100}
        while True:
            page = client.get("/v1/datasets", params=params).json()
            seen += [d["id"] for d in page["datasets"]]
            if page["next_cursor"] is None:
                return seen
            params["cursor"] = page["next_cursor"]

    assert every(user) == uploaded
    everything = every(admin)
    assert everything[: len(uploaded) + 1] == [theirs.json()["id"], *uploaded]
    assert len(everything) == len(set(everything))
    for params in ({"limit": 0}, {"limit": 101}, {"cursor": "bm90LWFuLWVudHJ5"}):
        assert user.get("/v1/datasets", params=params).status_code == 422, params
    forged = base64.urlsafe_b64encode(b"000000000000001:../x").decode()
    assert user.get("/v1/datasets", params={"cursor": forged}).status_code == 422

    # A delete frees a place, and the deleted dataset leaves the list.
    assert user.delete(f"/v1/datasets/{mine[0].json()['id']}").status_code == 204
    again = upload_dataset(user, TINY, "again.npz")
    assert again.status_code == 201, again.text
    newest = user.get("/v1/datasets", params={"limit": 100}).json()["datasets"]
    assert mine[0].json()["id"] not in [d["id"] for d in newest]
    assert newest[0]["id"] == again.json()["id"]
    for client, record in ((user, mine[1]), (user, again), (admin, theirs)):
        assert client.delete(f"/v1/datasets/{record.json()['id']}").status_code == 204
