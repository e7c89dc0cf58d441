"""Entry point of a local Beam worker process (the FnApiRunner's subprocess SDK harness).

Beam's own ``sdk_worker_main`` installs no console handler: the first warning any import logs on the
root logger (its BigQuery client module warns about ``apitools``) installs ``logging.basicConfig``'s,
at the harness's bootstrap level, INFO, so every worker printed its start-up and channel chatter
into the driver's console. This entry point installs one handler first, at the level the driver
passes (``--log-level``, see ``beam_jobs.make_pipeline``), then runs Beam's ``main`` unchanged.
"""

from __future__ import annotations

import logging
import sys


def main(argv: list[str]) -> None:
    level = argv[argv.index("--log-level") + 1] if "--log-level" in argv else "WARNING"
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(level)
    handler.setFormatter(logging.Formatter("beam worker %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    from apache_beam.runners.worker import sdk_worker_main

    sdk_worker_main.main(argv)


if __name__ == "__main__":
    main(sys.argv)
