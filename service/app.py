"""The API's ASGI factory under the name deployments use: ``smoothcert.service.app:create_app``.

The application itself is built in :mod:`smoothcert.service.api.app`.
"""

from smoothcert.service.api.app import create_app

__all__ = ["create_app"]
