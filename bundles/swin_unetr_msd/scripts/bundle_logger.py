"""The logger of this bundle; the modules shared by the project's bundles log through it."""

import logging

logger = logging.getLogger("swin_unetr_msd")
