"""The certificate store's retention on a temporary data dir: a certificate older than its
retention (its file's mtime, when it was issued) is deleted by the sweep with its job's entry, a
younger one stays, a deleted one is no job's any more, and sizes count in whole blocks."""

from __future__ import annotations

import hashlib
import os
import time

from smoothcert.service.core.certificates import CertificateStore
from smoothcert.service.core.jobs import new_job_id

DAY = 86400.0


def test_the_sweep_deletes_certificates_past_their_retention_and_their_job_entries(tmp_path):
    store = CertificateStore(tmp_path / "certificates")
    old_job, new_job = new_job_id(), new_job_id()
    old = store.put(old_job, b'{"old": true}')
    new = store.put(new_job, b'{"new": true}')
    assert old == hashlib.sha256(b'{"old": true}').hexdigest()
    issued = time.time() - 31 * DAY
    os.utime(store.path(old), (issued, issued))

    assert store.sweep(30 * DAY) == 1
    assert store.read(old) is None and store.of_job(old_job) is None
    assert not (store.root / "by-job" / old_job).exists()
    assert store.read(new) == b'{"new": true}' and store.of_job(new_job) == new
    assert store.sweep(30 * DAY) == 0 and sorted(store.all()) == [new]


def test_a_removed_certificate_is_no_jobs_and_sizes_count_in_blocks(tmp_path):
    store = CertificateStore(tmp_path / "certificates")
    job_id = new_job_id()
    sha = store.put(job_id, b"x" * 5000)
    block = max(512, os.statvfs(store.root).f_frsize)
    # the file in whole blocks, and a block for its by-job entry
    assert store.disk_bytes(sha) == block * (-(-5000 // block) + 1)
    assert store.remove(sha) and not store.remove(sha)
    assert store.of_job(job_id) is None and store.disk_bytes(sha) == 0
    # the job's next certificate is stored afresh (the old entry named nothing any more)
    again = store.put(job_id, b"y" * 10)
    assert store.of_job(job_id) == again
