"""pcavs-live's own top-level package: the command line (`pcavs_live.cli`), the session wiring
(`pcavs_live.pipeline`) and the shared bottom layer (`pcavs_live.common`).

One project-named package, so that an installed wheel puts no generic names such as `cli` or `common`
into site-packages (tests/test_install.py checks the wheel's top-level names). Deliberately empty: the
bottom layer `pcavs_live.common` must be importable without pulling in anything above it.
"""
