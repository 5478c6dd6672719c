"""The demo's options refuse counts the run cannot honour."""

from __future__ import annotations

import pytest

from loraledger.demo.options import DATANETS, DemoOptions


def test_options_refuse_bad_counts():
    with pytest.raises(ValueError, match="--adapters"):
        DemoOptions(adapters=len(DATANETS) + 1)
    with pytest.raises(ValueError, match="--requests"):
        DemoOptions(requests=0)
