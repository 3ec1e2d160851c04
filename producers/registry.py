"""Open a configured source by name."""

from __future__ import annotations

from sluice.producers.d1_source import open_d1_source
from sluice.producers.source import Source
from sluice.shared.errors import SourceError
from sluice.shared.settings import (
    AceIotSourceConfig,
    BinanceSourceConfig,
    CoinGeckoSourceConfig,
    CryptoCompareSourceConfig,
    D1SourceConfig,
    KvSourceConfig,
    Settings,
)


def open_source(settings: Settings, name: str) -> Source:
    cfg = settings.source_config(name)
    if cfg is None:
        known = ", ".join(sorted(settings.all_sources)) or "none configured"
        raise SourceError(f"unknown source {name!r} (known: {known})", source=name)
    if isinstance(cfg, D1SourceConfig):
        return open_d1_source(name, cfg, settings)
    if isinstance(cfg, KvSourceConfig):
        from sluice.producers.kv_source import open_kv_source

        return open_kv_source(name, cfg, settings)
    stream = settings.stream(cfg.stream)
    # Imported here: a D1-only deployment never loads the HTTP adapters.
    if isinstance(cfg, BinanceSourceConfig):
        from sluice.producers.binance import BinanceSource

        return BinanceSource(name, cfg, stream, settings)
    if isinstance(cfg, CryptoCompareSourceConfig):
        from sluice.producers.cryptocompare import CryptoCompareSource

        return CryptoCompareSource(name, cfg, stream, settings)
    if isinstance(cfg, AceIotSourceConfig):
        from sluice.producers.aceiot import AceIotSource

        return AceIotSource(name, cfg, stream, settings)
    if isinstance(cfg, CoinGeckoSourceConfig):
        from sluice.producers.coingecko import CoinGeckoSource

        return CoinGeckoSource(name, cfg, stream, settings)
    raise SourceError(f"source kind {cfg.kind!r} is not implemented yet", source=name)
