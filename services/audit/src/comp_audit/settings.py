"""``COMP_AUDIT__*`` settings, on top of the shared ones."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field

from comp_common.settings import CommonSettings


class AuditGroup(BaseModel):
    # The log, the checkpoints and (unless key_file says otherwise) the signing key.
    data_dir: Path = Path("audit-data")
    # None: DATA_DIR/audit.key.  Keep it elsewhere to keep it from whoever copies the log.
    key_file: Path | None = None
    # A new segment file is started once the current one would pass this size.
    segment_bytes: int = Field(default=64 * 1024 * 1024, ge=4096)
    # At most this many records, or about this many bytes of bodies, in one write + fsync.
    max_batch: int = Field(default=20_000, ge=1)
    max_batch_bytes: int = Field(default=16 * 1024 * 1024, ge=1)
    # Received and not yet written; a source waits (JetStream flow control holds the rest) beyond it.
    max_pending: int = Field(default=100_000, ge=1)
    max_pending_bytes: int = Field(default=64 * 1024 * 1024, ge=1)
    # A signed checkpoint after this many new records, or this long after the last one
    # when there is anything new, and at shutdown.
    checkpoint_every_records: int = Field(default=10_000, ge=1)
    checkpoint_every_seconds: float = Field(default=5.0, gt=0)
    # Retention of the api requests stream (the audit log itself keeps everything).
    requests_max_age_seconds: float = Field(default=7 * 24 * 3600, gt=0)
    requests_max_bytes: int = Field(default=1024**3, gt=0)
    # Largest number of records one query may return.
    max_query_limit: int = Field(default=10_000, ge=1)


class AuditSettings(CommonSettings):
    audit: AuditGroup = AuditGroup()
