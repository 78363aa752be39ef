"""The offline demo (``python -m kat_research.demo``): OPD vs KAT-OPD vs RandomTerm on the
running-total testbed, and the agreement trap on the student's own rollouts."""
