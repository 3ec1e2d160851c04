"""One settings object, read once from the environment and the TOML file, then passed down.

URLs and secrets come from the environment only (never from the committed TOML): SLUICE_BROKER_URL,
SLUICE_POSTGRES_URL, SLUICE_SQLITE_PATH, SLUICE_DATA_DIR, SLUICE_CONFIG, and per source the variable
its `api_token_env` names. An unset broker or PostgreSQL URL means the embedded server kept in the
data folder (shared/embedded.py).
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from shared.errors import ConfigError
from shared.streams import CATALOG, ConflictPolicy, Stream

SinkName = Literal["postgres", "sqlite"]
SINK_NAMES: tuple[SinkName, ...] = ("postgres", "sqlite")


class _Model(BaseModel):
    # strict: a TOML string or boolean is not silently taken for a number (`batch_size = true`).
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class Schedule(_Model):
    """Either `every` (seconds) or `cron` (five crontab fields, UTC)."""

    every: Annotated[float, Field(gt=0)] | None = None
    cron: str | None = None

    @model_validator(mode="after")
    def _one_of(self) -> Schedule:
        if (self.every is None) == (self.cron is None):
            raise ValueError("set exactly one of 'every' (seconds) or 'cron' (crontab string)")
        if self.cron is not None and len(self.cron.split()) != 5:
            raise ValueError(
                f"cron must have 5 fields (minute hour day month weekday): {self.cron!r}"
            )
        return self


class D1SourceConfig(_Model):
    """A D1 table read in id order: local (a SQLite file or wrangler's state) or remote (REST)."""

    kind: Literal["d1"]
    stream: str
    mode: Literal["local", "remote"] = "local"
    path: str | None = None
    wrangler_state: str | None = None
    database_id: str | None = None
    account_id: str | None = None
    api_token_env: str = "CLOUDFLARE_API_TOKEN"
    base_url: str = "https://api.cloudflare.com/client/v4"
    table: str | None = None
    key_column: str = "id"
    batch_size: Annotated[int, Field(ge=1, le=100_000)] = 1000
    max_batches: Annotated[int, Field(ge=1)] = 10
    schedule: Schedule | None = None

    @model_validator(mode="after")
    def _mode_fields(self) -> D1SourceConfig:
        if self.mode == "local" and not (self.path or (self.wrangler_state and self.database_id)):
            raise ValueError("local mode needs 'path', or 'wrangler_state' with 'database_id'")
        if self.mode == "remote" and not (self.account_id and self.database_id):
            raise ValueError("remote mode needs 'account_id' and 'database_id'")
        return self


SourceConfig = D1SourceConfig


class StreamConfig(_Model):
    sinks: list[SinkName] = Field(default_factory=lambda: list(SINK_NAMES))
    conflict: ConflictPolicy | None = None


class PipelineConfig(_Model):
    page_size: Annotated[int, Field(ge=1, le=100_000)] = 1000
    data_dir: str | None = None
    visibility_timeout: Annotated[int, Field(ge=5)] = 3600
    # A page in flight longer than this is presumed lost and its rows are read again.
    inflight_lease: Annotated[float, Field(gt=0)] = 4 * 3600
    max_retries: Annotated[int, Field(ge=0, le=100)] = 8
    sqlite_busy_timeout_ms: Annotated[int, Field(ge=0)] = 30_000


class FileConfig(_Model):
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig)
    streams: dict[str, StreamConfig] = Field(default_factory=dict)
    sources: dict[str, D1SourceConfig] = Field(default_factory=dict)


@dataclass(frozen=True)
class Settings:
    config_path: Path | None
    data_dir: Path
    broker_url: str | None  # None: the embedded Redis in data_dir
    postgres_url: str | None  # None: the embedded PostgreSQL in data_dir
    sqlite_path: Path
    pipeline: PipelineConfig
    streams: dict[str, Stream]
    sources: dict[str, SourceConfig]
    env: Mapping[str, str] = field(repr=False, default_factory=dict)

    @classmethod
    def load(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = dict(os.environ if env is None else env)
        path_text = env.get("SLUICE_CONFIG")
        if path_text:
            path: Path | None = Path(path_text)
        elif Path("sluice.toml").exists():
            path = Path("sluice.toml")
        else:
            path = None
        raw = _read_toml(path) if path else {}
        cfg = parse_config(raw, str(path) if path else "<defaults>")
        base = path.parent if path else Path.cwd()
        data_dir = Path(env.get("SLUICE_DATA_DIR") or cfg.pipeline.data_dir or ".sluice")
        if not data_dir.is_absolute():
            data_dir = (
                base if cfg.pipeline.data_dir and not env.get("SLUICE_DATA_DIR") else Path.cwd()
            ) / data_dir
        sqlite_text = env.get("SLUICE_SQLITE_PATH")
        sqlite_path = Path(sqlite_text) if sqlite_text else data_dir / "sluice.sqlite"
        streams: dict[str, Stream] = {}
        for name, stream in CATALOG.items():
            sc = cfg.streams.get(name, StreamConfig())
            streams[name] = stream.with_settings(
                sinks=tuple(sc.sinks), conflict=sc.conflict or stream.conflict
            )
        sources = {
            name: src.model_copy(update=_resolve_paths(src, base))
            for name, src in cfg.sources.items()
        }
        return cls(
            config_path=path,
            data_dir=data_dir.resolve(),
            broker_url=env.get("SLUICE_BROKER_URL") or None,
            postgres_url=env.get("SLUICE_POSTGRES_URL") or None,
            sqlite_path=sqlite_path.resolve(),
            pipeline=cfg.pipeline,
            streams=streams,
            sources=sources,
            env=env,
        )

    def stream(self, name: str) -> Stream:
        from shared.errors import UnknownStreamError

        try:
            return self.streams[name]
        except KeyError:
            raise UnknownStreamError(
                f"unknown stream {name!r}; known: {', '.join(sorted(self.streams))}", stream=name
            ) from None

    def secret(self, variable: str) -> str | None:
        return self.env.get(variable) or None


def _resolve_paths(src: D1SourceConfig, base: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for attr in ("path", "wrangler_state"):
        value = getattr(src, attr)
        if value and not Path(value).is_absolute():
            out[attr] = str((base / value).resolve())
    return out


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError([f"file not found: {path}"], str(path)) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"not valid TOML: {exc}"], str(path)) from None


def parse_config(raw: dict[str, Any], file: str) -> FileConfig:
    """Validate the TOML document; every mistake is reported with its key and what was expected."""
    problems: list[str] = []
    cfg: FileConfig | None = None
    try:
        cfg = FileConfig.model_validate(raw)
    except ValidationError as exc:
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith("function-after"))
            got = err.get("input")
            shown = "" if isinstance(got, dict) else f" (got {got!r})"
            msg = err["msg"].removeprefix("Value error, ")
            problems.append(f"{loc or '<top>'}: {msg}{shown}")
    # Checked on the raw document so they are reported alongside the errors above.
    sources = raw.get("sources")
    for name, src in sources.items() if isinstance(sources, dict) else ():
        stream = src.get("stream") if isinstance(src, dict) else None
        if isinstance(stream, str) and stream not in CATALOG:
            problems.append(
                f"sources.{name}.stream: unknown stream {stream!r}"
                f" (expected one of: {', '.join(sorted(CATALOG))})"
            )
    streams = raw.get("streams")
    for name, sc in streams.items() if isinstance(streams, dict) else ():
        if name not in CATALOG:
            problems.append(
                f"streams.{name}: unknown stream (expected one of: {', '.join(sorted(CATALOG))})"
            )
        elif (
            isinstance(sc, dict)
            and sc.get("conflict") == "newer"
            and CATALOG[name].version_column is None
        ):
            problems.append(
                f"streams.{name}.conflict: 'newer' needs a version column and {name} has none"
                " (expected 'ignore' or 'update')"
            )
    if problems or cfg is None:
        raise ConfigError(problems, file)
    return cfg
