#!/usr/bin/env python
"""Publish a DeepSeek-V3.2 checkpoint on the Hugging Face Hub so that it loads anywhere (``--help`` for usage).

The implementation is installed with the package as ``modeling_deepseek_v32.conversion.hub_upload`` (also reachable
as ``deepseek-v32 upload``); this script is its entry point in a checkout.
"""

import sys

from modeling_deepseek_v32.conversion.hub_upload import *  # noqa: F401,F403  (the importable API, as before)
from modeling_deepseek_v32.conversion.hub_upload import main

if __name__ == "__main__":
    sys.exit(main())
