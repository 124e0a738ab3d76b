"""smoothcert's service side: the API, the CLI, the Python client, the shared contract, the dev stack.

``__version__`` is the one place the version is written: pyproject.toml reads it
(``[tool.setuptools.dynamic]``) and the API's OpenAPI document states it.
"""

__version__ = "0.1.0"
