"""Thin helpers over pyroute2 and setns: the only code that talks rtnetlink."""
