"""Assertions for the Python end-to-end tests: each check counts, a failure prints its detail
and the run goes on, so one run reports every failure; finish() prints the tally and exits."""
import sys

passed = failed = 0


def check(name, cond, detail=""):
    global passed, failed
    if cond:
        passed += 1
    else:
        failed += 1
        print(f"FAIL {name} {detail}")


def finish():
    print(f"{passed} passed, {failed} failed")
    sys.exit(1 if failed else 0)
