"""Test-run hooks: a skipped browser test is named at the end of the run, never skipped without a word."""

import pytest


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter):
    skipped = [report for report in terminalreporter.stats.get("skipped", [])
               if "browser" in getattr(report, "keywords", {})]
    if not skipped:
        return
    terminalreporter.section(f"{len(skipped)} browser test(s) skipped: the report was NOT checked in a browser",
                             sep="=", yellow=True, bold=True)
    for report in skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        terminalreporter.write_line(f"{report.nodeid}: {reason.removeprefix('Skipped: ')}")
    terminalreporter.write_line("To run it: install Chromium and ChromeDriver (as root: bash "
                                "scripts/install_browser.sh, which `make test` runs) and `pip install -e '.[dev]'` "
                                "for selenium.")
