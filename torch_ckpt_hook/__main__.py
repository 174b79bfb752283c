"""``python -m torch_ckpt_hook``: the ``torch-ckpt`` command."""

from ._cli import main

raise SystemExit(main())
