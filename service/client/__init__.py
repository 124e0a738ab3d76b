"""The Python client of the API v1: :class:`ServiceClient` (see :mod:`.service_client`)."""

from smoothcert.service.client.service_client import ClientError, ServiceClient

__all__ = ["ClientError", "ServiceClient"]
