"""Open a configured source by name: each kind of source has one class that answers for it."""

from __future__ import annotations

from sluice.producers.aceiot import AceIotSource
from sluice.producers.binance import BinanceSource
from sluice.producers.coingecko import CoinGeckoSource
from sluice.producers.cryptocompare import CryptoCompareSource
from sluice.producers.d1_source import open_d1_source
from sluice.producers.http_source import HttpSource
from sluice.producers.kv_source import open_kv_source
from sluice.producers.source import Source
from sluice.shared.settings import D1SourceConfig, KvSourceConfig, Settings

HTTP_KINDS: dict[str, type[HttpSource]] = {
    "binance": BinanceSource,
    "coingecko": CoinGeckoSource,
    "cryptocompare": CryptoCompareSource,
    "aceiot": AceIotSource,
}


def open_source(settings: Settings, name: str) -> Source:
    cfg = settings.source(name)
    if isinstance(cfg, D1SourceConfig):
        return open_d1_source(name, cfg, settings)
    if isinstance(cfg, KvSourceConfig):
        return open_kv_source(name, cfg, settings)
    return HTTP_KINDS[cfg.kind](name, cfg, settings.stream(cfg.stream), settings)
