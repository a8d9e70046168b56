from __future__ import annotations

import pytest

from checks import ISAS


@pytest.fixture(params=ISAS)
def isa(request: pytest.FixtureRequest) -> str:
    """Every kernel variant this CPU runs."""
    return str(request.param)


def pytest_configure(config: pytest.Config) -> None:
    # Hypothesis' failure report touches mypy_extensions.TypedDict (deprecated), and with
    # `filterwarnings = error` that warning would hide the falsifying example behind an
    # INTERNALERROR.
    config.addinivalue_line(
        "filterwarnings", "ignore:mypy_extensions.TypedDict is deprecated:DeprecationWarning"
    )
