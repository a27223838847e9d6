"""pytest configuration shared by the suite."""


def pytest_configure(config):
    config.addinivalue_line("markers", "slurm: needs a running SLURM (tests/slurm/setup_slurm.sh); run with -m slurm")
