from __future__ import annotations

import httpx

from pipeline.settings import Settings
from pipeline.stack import superset_server


def test_api_lists_the_telemetry_database_through_the_reader_role(stack: Settings) -> None:
    with httpx.Client(base_url=stack.superset_url, timeout=30) as client:
        token = superset_server.login(stack, client)
        headers = {"Authorization": f"Bearer {token}"}
        databases = client.get("/api/v1/database/", headers=headers).json()["result"]
        telemetry = next(d for d in databases if d["database_name"] == "telemetry")
        detail = client.get(
            f"/api/v1/database/{telemetry['id']}/connection", headers=headers
        ).json()
        # The stored URI names the read-only role (its password masked by Superset).
        assert detail["result"]["sqlalchemy_uri"].startswith(
            "postgresql+psycopg2://telemetry_reader:"
        )
        schemas = client.get(f"/api/v1/database/{telemetry['id']}/schemas/", headers=headers)
        assert "public" in schemas.json()["result"]  # the stored password really connects


def test_wrong_password_is_refused(stack: Settings) -> None:
    answer = httpx.post(
        f"{stack.superset_url}/api/v1/security/login",
        json={"username": stack.superset_admin_user, "password": "nope", "provider": "db"},
        timeout=30,
    )
    assert answer.status_code == 401
