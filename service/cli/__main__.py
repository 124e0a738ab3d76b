"""``python -m smoothcert.service.cli``: the ``smoothcert`` command."""

import sys

from smoothcert.service.cli.main import main

sys.exit(main())
