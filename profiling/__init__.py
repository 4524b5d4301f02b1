"""GPU memory prediction and planning: trace a few-layer prototype of the job (``trace``), compose one
rank's whole run from it (``simulator``, ``allocator``, ``program``), report it (``report``,
``dry_run``), search plans that fit (``plan``, ``roofline``) and check it against real runs
(``validate``, ``measure``)."""
