"""Site settings: embedded defaults < YAML file (``--config``) < ``LISPLUGIN_<SECTION>__<KEY>``.

The defaults run everything on one machine: SQLite and local folders under ``./var``, the LIS
simulator on loopback, the models shipped in ``models/``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
#: Where an installed wheel carries ``models/`` and ``config/`` (copied in by setup.py).
SHIPPED_DIR = Path(__file__).resolve().parent / "_shipped"
_DATA_ROOT = SHIPPED_DIR if (SHIPPED_DIR / "config").is_dir() else REPO_ROOT
DEFAULT_CONFIG_DIR = _DATA_ROOT / "config"
DEFAULT_MODELS_DIR = _DATA_ROOT / "models"


class TlsSettings(BaseModel):
    """TLS for one listener or connection, off unless ``enabled``. A listener needs
    ``cert_file`` and ``key_file``; with ``ca_file`` it requires client certificates signed by
    that CA (mutual TLS). A client verifies the server against ``ca_file``."""

    enabled: bool = False
    cert_file: Path | None = None
    key_file: Path | None = None
    ca_file: Path | None = None


class InstanceLimits(BaseModel):
    """What one received instance may make us spend; over a limit it is refused, not decoded."""

    #: Rows x Columns of one frame (a decoded RGB frame takes 3 bytes per pixel).
    max_pixels_per_frame: int = 40_000_000
    max_frames: int = 100_000
    #: The data set as received (deflated: as inflated); larger ones are aborted while arriving.
    max_instance_bytes: int = 512 * 1024 * 1024
    #: Everything but Pixel Data (private tags, sequences, ICC profile).
    max_header_bytes: int = 16 * 1024 * 1024
    #: Inflated size / deflated size for the Deflated Explicit VR Little Endian syntax.
    max_inflation_ratio: float = 100.0


class DicomSettings(BaseModel):
    ae_title: str = "LISPLUGIN"
    host: str = "0.0.0.0"
    port: int = 11112
    #: Largest P-DATA PDU we accept (announced to peers; a larger PDU aborts the association).
    max_pdu: int = 1024 * 1024
    #: Calling AE titles allowed to store; empty allows any.
    allowed_calling_aets: list[str] = Field(default_factory=list)
    #: Answer Modality Worklist C-FIND queries with the scheduled orders (same AE and port).
    worklist: bool = True
    #: Processes accepting associations on the port (SO_REUSEPORT, Linux): the daemon and
    #: ``ingest_processes - 1`` ingest workers, so that several associations use several CPU
    #: cores. The association limits below hold per process.
    ingest_processes: int = Field(default=1, ge=1)
    #: Concurrent associations (connections not yet associated count too).
    max_associations: int = 32
    #: Concurrent connections from one address (a modality, or an idle or hostile host).
    max_associations_per_peer: int = 8
    #: Seconds to wait for an A-ASSOCIATE-RQ / A-RELEASE (an idle connection is dropped).
    acse_timeout: float = 10.0
    #: Seconds to wait for the next DIMSE message of an association.
    dimse_timeout: float = 30.0
    #: Seconds without any data on a connection before it is closed.
    network_timeout: float = 60.0
    limits: InstanceLimits = InstanceLimits()
    #: DICOM TLS (PS3.15 Annex B secure transport; usually port 2762).
    tls: TlsSettings = TlsSettings()


class Hl7Settings(BaseModel):
    listen_host: str = "0.0.0.0"
    listen_port: int = 2575
    lis_host: str = "127.0.0.1"
    lis_port: int = 2576
    sending_application: str = "LISPLUGIN"
    sending_facility: str = "LAB"
    receiving_application: str = "LIS"
    receiving_facility: str = "LAB"
    ack_timeout_seconds: float = 10.0
    #: Order listener bounds: a silent connection (or unfinished message) is closed after
    #: read_timeout_seconds; more than max_connections are refused; larger messages get AR.
    read_timeout_seconds: float = 60.0
    max_connections: int = 64
    max_message_bytes: int = 4 * 1024 * 1024
    #: Order listener allow-lists, enforced when set: peer addresses or networks, and sending
    #: applications (``APP`` or ``APP^FACILITY``, MSH-3/MSH-4).
    allowed_peers: list[str] = Field(default_factory=list)
    allowed_senders: list[str] = Field(default_factory=list)
    #: MLLP over TLS for the order listener, and for the connection to the LIS.
    listen_tls: TlsSettings = TlsSettings()
    lis_tls: TlsSettings = TlsSettings()
    retry_initial_seconds: float = 2.0
    retry_max_seconds: float = 300.0
    #: A result the LIS answers AR (refused for now) is parked after this many attempts.
    max_attempts_refused: int = 5
    #: /readyz reports "degraded" while a result has waited longer than this for its ACK.
    overdue_seconds: float = 600.0


class HttpSettings(BaseModel):
    host: str = "127.0.0.1"
    port: int = 8080
    #: A review-station session ends after this many minutes without a request.
    session_idle_minutes: float = 480.0
    #: Largest STOW-RS request body (all instances of one POST /dicomweb/studies), in MB.
    max_stow_mb: int = 512
    #: Failed sign-ins allowed per user name, and per client address, within the lockout
    #: window; past either the name (or address) is locked until the window has moved on.
    sign_in_failures_per_user: int = 5
    sign_in_failures_per_address: int = 20
    sign_in_lockout_minutes: float = 15.0
    #: HTTPS served by uvicorn (cert_file, key_file); or terminate TLS at a reverse proxy.
    tls: TlsSettings = TlsSettings()


class DatabaseSettings(BaseModel):
    #: Any SQLAlchemy URL; empty means SQLite at ``<storage.path>/lisplugin.db``.
    url: str = ""
    #: Upgrade the schema when the daemon starts; false: ``lisplugin db upgrade`` does it, and
    #: the daemon refuses to start on an older schema (production: see deploy/README.md).
    migrate_on_start: bool = True
    #: Each process looks in the database for work at least this often (seconds): with several
    #: processes on one PostgreSQL database, captures another process received and work a
    #: killed process left are found within this time. One process is woken at once anyway.
    poll_seconds: float = 5.0
    #: A process claims a queued case for this long (seconds) and renews the claim every third
    #: of it while analysing; if the process dies, another one analyses the case once the claim
    #: has run out.
    analysis_lease_seconds: float = 60.0
    #: A process claims an outgoing message for this long (seconds) while it sends it; no other
    #: process sends it meanwhile. Longer than a connection attempt plus the ACK timeout.
    send_lease_seconds: float = 120.0


class StorageSettings(BaseModel):
    path: Path = Path("var")
    #: /readyz fails (and captures should go elsewhere) when less space than this is free.
    min_free_mb: int = 500
    #: Answer a C-STORE once the instance is in the ingest spool (one sync) and file it in the
    #: background; off: written and recorded before the answer (three syncs, slower).
    spool: bool = True
    #: The spool's SQLite file; empty: ``<path>/ingest-spool.sqlite``. It must be on a disk of
    #: this host (SQLite's WAL): with ``path`` on a shared file system, give each host its own.
    spool_path: Path | None = None
    #: Larger instances (whole-slide levels) skip the spool: written to their file directly.
    spool_max_instance_mb: int = Field(default=16, ge=1)
    #: Spooled bytes not yet filed beyond which captures are filed before the answer again.
    spool_backlog_mb: int = Field(default=256, ge=1)

    @field_validator("spool_path", mode="before")
    @classmethod
    def _default_spool(cls, value: Any) -> Any:
        return value or None  # "" in YAML or the environment: beside the instances


class CaseSettings(BaseModel):
    #: A case is analysed once no new instance arrived for this many seconds.
    stable_seconds: float = 10.0
    #: Reports still owed this long after their result was released are made again.
    report_retry_seconds: float = 60.0


class AnalysisSettings(BaseModel):
    models_dir: Path = DEFAULT_MODELS_DIR
    detector: str = "cell-detector"
    classifier: str = "leukocyte-classifier"
    #: A leukocyte whose calibrated top probability is under this is reported "unidentified".
    min_class_probability: float = 0.6
    min_wbc_classified: int = 100
    #: This lab's share of leukocyte classes (e.g. {erythroblast: 0.05, ig: 0.05}); the classes
    #: left out keep their training proportions in what those leave. The classifier's
    #: probabilities are moved to it from the class mix it was trained under; empty: the model
    #: card's ``prevalence`` (as shipped: peripheral blood's few immature granulocytes,
    #: erythroblasts and platelets). See ``lisplugin.core.prevalence``.
    leukocyte_prevalence: dict[str, float] = {}
    #: Minimum variance of the Laplacian for a field to count as in focus ...
    min_focus: float = 20.0
    #: ... unless its sharpness (the Laplacian's share of the fine detail, free of contrast)
    #: reaches this: a pale stain or a dim lamp lowers the Laplacian of a sharp field too.
    min_sharpness: float = 0.3
    exposure_range: tuple[float, float] = (0.25, 0.92)
    max_clipped_fraction: float = 0.2
    #: Relative disagreement between detector counts and the count regression that raises a flag.
    count_tolerance: float = 0.35
    #: A whole slide is analysed in its monolayer, best tiles first, until this many
    #: leukocytes are counted.
    slide_leukocyte_target: int = 200
    #: Each slide tile is analysed with this much of its neighbours around it (a large
    #: leukocyte's radius), so that cells on tile borders are seen whole and counted once.
    slide_window_margin_um: float = 10.0
    #: Neighbouring tiles are analysed together in windows up to this side (slide pixels, with
    #: the margin): fewer, larger windows spend less on margins (x2.3 the area of a 512 px tile
    #: at BCCD's magnification, x1.6 for a block of 2 x 2 tiles).
    slide_window_px: int = Field(1536, ge=64)

    @field_validator("models_dir", mode="before")
    @classmethod
    def _shipped_models(cls, value: Any) -> Any:
        return value or DEFAULT_MODELS_DIR


class ReviewSettings(BaseModel):
    #: A technologist completes the technical review before a pathologist may sign out.
    two_stage: bool = False


class PacsSettings(BaseModel):
    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = 4242
    ae_title: str = "ORTHANC"


class RetentionSettings(BaseModel):
    """How long ``lisplugin purge`` keeps things; 0 keeps them for ever.

    Only closed cases (final, verified, cancelled) lose captures and reports; case rows, results
    and the audit trail stay in the database as the laboratory's record.
    """

    #: Days after a closed case last changed that its received captures are kept.
    images_days: int = 0
    #: Days after a closed case last changed that its report folder is kept.
    reports_days: int = 0
    #: Days a replaced DICOM report object (SR, annotations, PDF) is kept after it was written.
    superseded_reports_days: int = 30
    #: Days a refused (quarantined) instance and its reason are kept.
    quarantine_days: int = 90
    #: Days the database keeps a delivered outgoing message (HL7 ORU, DICOM object).
    outbox_days: int = 90


class LoggingSettings(BaseModel):
    #: "text" for people reading a terminal or journal, "json" for a log collector.
    format: Literal["text", "json"] = "text"
    level: str = "INFO"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="LISPLUGIN_", env_nested_delimiter="__", extra="ignore"
    )

    dicom: DicomSettings = DicomSettings()
    hl7: Hl7Settings = Hl7Settings()
    http: HttpSettings = HttpSettings()
    database: DatabaseSettings = DatabaseSettings()
    storage: StorageSettings = StorageSettings()
    cases: CaseSettings = CaseSettings()
    analysis: AnalysisSettings = AnalysisSettings()
    pacs: PacsSettings = PacsSettings()
    review: ReviewSettings = ReviewSettings()
    logging: LoggingSettings = LoggingSettings()
    retention: RetentionSettings = RetentionSettings()
    config_dir: Path = DEFAULT_CONFIG_DIR

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Environment wins over the YAML file, which is passed as init values.
        return env_settings, init_settings

    @field_validator("config_dir", mode="before")
    @classmethod
    def _shipped_config(cls, value: Any) -> Any:
        return value or DEFAULT_CONFIG_DIR

    @property
    def database_url(self) -> str:
        return self.database.url or f"sqlite:///{(self.storage.path / 'lisplugin.db').resolve()}"

    def load_yaml(self, name: str) -> Any:
        """Read one of the site-editable YAML files (LOINC map, ranges, rules) from config_dir."""
        return yaml.safe_load((self.config_dir / name).read_text(encoding="utf-8"))


def load_settings(path: Path | None = None) -> Settings:
    values: dict[str, Any] = {}
    if path is not None:
        values = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        if not isinstance(values, dict):
            raise ValueError(f"{path}: settings file must hold a mapping")
    return Settings(**values)
