"""Check the Prefect API a command will report to, before anything is written."""

from __future__ import annotations

from evomerge_core.errors import EvomergeError


class PrefectAPIError(EvomergeError):
    """PREFECT_API_URL names an API that does not answer (exit code 1)."""


def check_api() -> None:
    """With PREFECT_API_URL set, its health check must pass; without it (a temporary local API
    is started for the run) there is nothing to check."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        return
    with get_client(sync_client=True) as client:
        failure = client.api_healthcheck()
    if failure is not None:
        raise PrefectAPIError(
            f"cannot reach the Prefect API at {url} ({type(failure).__name__}: {failure}); start it "
            "(`prefect server start`) or fix PREFECT_API_URL, or unset PREFECT_API_URL to run on a temporary "
            "local API")
