"""``python -m ketch.shim``: the long-lived shim server that ``start`` launches."""

import sys

# asyncio imports ssl when it can, which maps OpenSSL into the process: about 4 MiB of a
# shim's memory for nothing, since a shim speaks only over unix sockets. Without it asyncio
# simply has no TLS support.
sys.modules.setdefault("ssl", None)  # type: ignore[arg-type]

from ketch.shim.main import main  # noqa: E402

sys.exit(main())
