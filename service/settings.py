"""Service settings, read from ``FUNDUS_*`` environment variables (and an optional ``.env`` file).

Nothing here is read at import time: :func:`load_settings` builds a fresh object, so tests pass
their own :class:`Settings` to ``create_app`` and the process environment never leaks between apps.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from model.artifact import BUNDLED_WEIGHTS
from model.quality import BUNDLED_QUALITY


class Settings(BaseSettings):
    """Every knob of ``fundus serve``; the README lists them with their defaults."""

    model_config = SettingsConfigDict(env_prefix="FUNDUS_", env_file=".env", extra="ignore")

    weights: Path = Field(default=BUNDLED_WEIGHTS, description="weight artifact (.safetensors) to serve")
    device: str = Field(default="auto", description="auto, cpu, cuda or cuda:N")
    redis_url: str | None = Field(
        default=None, description="use the Redis Streams queue instead of the embedded one"
    )
    redis_password: SecretStr | None = Field(
        default=None,
        description="Redis password, any characters (kept out of FUNDUS_REDIS_URL, where '/', '@' or "
        "'#' would have to be percent-encoded)",
    )
    redis_stream_prefix: str = Field(
        default="fundus", description="prefix of every Redis key (shared with workers)"
    )
    max_batch_size: int = Field(default=8, ge=1, le=256, description="largest model batch")
    max_batch_wait_ms: float = Field(
        default=10.0, ge=0.0, le=10_000.0, description="longest a request waits for its batch to fill"
    )
    max_queue: int = Field(default=64, ge=1, description="jobs allowed to wait for the model; beyond → 429")
    request_timeout_s: float = Field(default=30.0, gt=0.0, description="per-request deadline → 504")
    max_upload_mb: float = Field(default=32.0, gt=0.0, description="largest request body in MiB → 413")
    body_timeout_s: float = Field(default=30.0, gt=0.0, description="the whole body must arrive within → 408")
    body_idle_timeout_s: float = Field(default=10.0, gt=0.0, description="longest pause in a body → 408")
    body_min_rate_bps: float = Field(
        default=1024.0, ge=0.0, description="slowest average body rate after 5 s, bytes/s (0 = off) → 408"
    )
    max_pixels: int = Field(
        default=64_000_000, ge=1, description="largest decoded image (width × height) → 413"
    )
    min_image_side: int = Field(default=64, ge=1, description="smaller images are refused with 422")
    max_degrade_pixels: int = Field(
        default=24_000_000,
        ge=1,
        description="largest image /degrade accepts (it works at full resolution) → 413",
    )
    max_degrade_jobs: int = Field(default=1, ge=1, description="degradations running at the same time")
    api_keys: str = Field(default="", repr=False, description="comma-separated API keys; empty disables auth")
    metrics_auth: bool = Field(default=False, description="also require an API key on /metrics")
    dicomweb_url: str | None = Field(default=None, description="DICOMweb STOW-RS endpoint for DICOM results")
    host: str = Field(default="0.0.0.0", description="bind address of `fundus serve`")
    port: int = Field(default=8000, ge=1, le=65535, description="bind port of `fundus serve`")
    workers: int = Field(
        default=1,
        ge=1,
        description="API processes; with more than one (and no Redis) they share one local model process",
    )
    model_socket: str | None = Field(
        default=None,
        description="Unix socket of the local model process; set by `fundus serve --workers N` for its "
        "API processes (leave unset)",
    )
    output_method: Literal["transfer", "resize"] = Field(
        default="transfer", description="how the working-size result is mapped back to the input resolution"
    )
    shutdown_timeout_s: float = Field(
        default=30.0, ge=0.0, description="drain time for in-flight work on stop"
    )
    cpu_workers: int = Field(
        default=0, ge=0, description="threads for decode/FOV/resize/encode; 0 = min(4, CPU count)"
    )
    torch_threads: int = Field(
        default=0, ge=0, description="intra-op threads for the model; 0 = torch default"
    )
    reuse_freed_memory: bool = Field(
        default=True,
        description="CPU: keep freed activations in the heap (no page faults per batch; peak stays resident)",
    )
    warmup: bool = Field(default=True, description="run one model pass before reporting ready")
    cuda_graphs: bool = Field(
        default=True,
        description="CUDA only: replay the model pass as CUDA graphs, one per batch-size bucket "
        "(captured at warm-up)",
    )
    trust_signals: bool = Field(
        default=True,
        description="uncertainty and structure fidelity on every enhancement (one vessel pass more)",
    )
    quality_weights: str = Field(
        default=str(BUNDLED_QUALITY), description="quality grader (.safetensors); empty disables grading"
    )
    enhance_only_if_needed: bool = Field(
        default=False,
        description="default of /enhance's only_if_needed: return photographs the quality grader finds "
        "good unchanged (a request's own only_if_needed wins); needs the quality grader",
    )
    structure_min_dice: float = Field(
        default=0.7,
        ge=0.0,
        le=1.0,
        description="vessel-map Dice below which an enhancement carries a warning",
    )
    log_level: str = Field(default="INFO", description="DEBUG, INFO, WARNING or ERROR")
    # `fundus dicom-node`: the DIMSE Storage SCP between cameras and the PACS (service/dimse).
    dimse_ae_title: str = Field(
        default="FUNDUS", min_length=1, max_length=16, description="AE title of `fundus dicom-node`"
    )
    dimse_host: str = Field(default="0.0.0.0", description="bind address of the DICOM port and its /metrics")
    dimse_port: int = Field(
        default=11112, ge=0, le=65535, description="DICOM (DIMSE) port; 0 = any free port"
    )
    dimse_metrics_port: int = Field(
        default=9110, ge=0, le=65535, description="/metrics, /healthz, /readyz port of the node; 0 = off"
    )
    dimse_destination: str | None = Field(
        default=None, description="where derived instances go by C-STORE: AE@host:port"
    )
    dimse_spool_dir: Path = Field(
        default=Path("dimse-spool"), description="durable spool of received and derived instances"
    )
    dimse_allowed_ae_titles: str = Field(
        default="", description="comma-separated calling AE titles allowed to associate; empty = any"
    )
    dimse_allowed_hosts: str = Field(
        default="", description="comma-separated peer addresses or networks (CIDR) allowed; empty = any"
    )
    dimse_max_associations: int = Field(
        default=8, ge=1, le=1000, description="concurrent incoming associations; more are rejected"
    )
    dimse_acse_timeout_s: float = Field(
        default=30.0, gt=0.0, description="association set-up/release timeout"
    )
    dimse_dimse_timeout_s: float = Field(default=60.0, gt=0.0, description="wait for a DIMSE message")
    dimse_network_timeout_s: float = Field(
        default=60.0, gt=0.0, description="idle network connection timeout"
    )
    dimse_segment: bool = Field(default=False, description="also send the vessel map as a DICOM Segmentation")
    dimse_forward_original: bool = Field(
        default=False, description="also forward the received instance unchanged"
    )
    dimse_concurrency: int = Field(
        default=4, ge=1, le=256, description="instances decoded, enhanced and encoded at the same time"
    )
    dimse_send_associations: int = Field(
        default=2, ge=1, le=32, description="outgoing associations to the destination at the same time"
    )
    dimse_retry_initial_s: float = Field(default=2.0, gt=0.0, description="first retry delay (doubles)")
    dimse_retry_max_s: float = Field(default=300.0, gt=0.0, description="longest retry delay")
    dimse_send_max_attempts: int = Field(
        default=0, ge=0, description="failed sends before an item is set aside in failed/; 0 = retry forever"
    )

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        level = value.strip().upper()
        if level not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
            raise ValueError(f"unknown log level {value!r}")
        return level

    @model_validator(mode="after")
    def _grader_for_default_skip(self) -> Settings:
        if self.enhance_only_if_needed and not self.quality_weights.strip():
            raise ValueError(
                "FUNDUS_ENHANCE_ONLY_IF_NEEDED=true needs the quality grader "
                "(FUNDUS_QUALITY_WEIGHTS is empty)"
            )
        return self

    @property
    def api_key_list(self) -> list[str]:
        """Configured keys, blanks dropped; an empty list means the image endpoints are open."""
        return [key.strip() for key in self.api_keys.split(",") if key.strip()]

    @property
    def redis_connection_url(self) -> str | None:
        """``redis_url`` with ``redis_password`` (percent-encoded) in place of any password it has."""
        if not self.redis_url or self.redis_password is None:
            return self.redis_url
        return with_password(self.redis_url, self.redis_password.get_secret_value())

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    @property
    def cpu_threads(self) -> int:
        return self.cpu_workers or max(1, min(4, os.cpu_count() or 1))


def with_password(url: str, password: str) -> str:
    """``url`` with ``password`` percent-encoded into its user-info (redis-py decodes it again)."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    user = quote(unquote(parts.username), safe="") if parts.username else ""
    netloc = f"{user}:{quote(password, safe='')}@{host}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def load_settings() -> Settings:
    """Settings from the current environment."""
    return Settings()
