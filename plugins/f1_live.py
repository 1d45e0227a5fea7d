"""Airflow plugin: the live telemetry page (`pipeline.live.app`) mounted on the
api-server at /f1, with an entry in the UI's navigation that shows it inside
Airflow. Only wiring lives here; Airflow's own JWT check guards every route."""

from __future__ import annotations

from typing import Any, ClassVar

from airflow.api_fastapi.app import get_auth_manager
from airflow.api_fastapi.core_api.security import get_user
from airflow.plugins_manager import AirflowPlugin

from pipeline.live.app import create_app
from pipeline.settings import get_settings


def _login_url(next_url: str) -> str:
    return get_auth_manager().get_url_login(next_url=next_url)


class F1LivePlugin(AirflowPlugin):
    name = "f1_live"
    fastapi_apps: ClassVar[list[dict[str, Any]]] = [
        {
            "app": create_app(get_settings(), get_user, _login_url),
            "url_prefix": "/f1",
            "name": "F1 live telemetry",
        }
    ]
    external_views: ClassVar[list[dict[str, Any]]] = [
        {
            "name": "F1 live",
            "href": "f1/live",  # relative to Airflow's base URL
            "url_route": "f1-live",  # shown inside the Airflow UI at /plugin/f1-live
            "destination": "nav",
            "nav_top_level": True,
        }
    ]
