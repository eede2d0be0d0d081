"""robalign.app.commands — the ``robalign`` command line.

    cli.py          the parser and the subcommands (weigh, train, eval, demo, bench, backends, ...)
    train.py        ``robalign train``: model loading (a folder, or the embedded tiny Llama), the run
    demo.py         ``robalign demo``: the embedded default end to end, DoRA against its baselines
"""
