"""Where a trial runs: one interface (base.Host), one backend per kind of host."""
