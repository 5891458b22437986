"""Runs a command and prints its peak resident memory (getrusage of the child) to stderr as
`peak RSS: N MiB`; exits with the command's status. Portable stand-in for /usr/bin/time -v."""
import resource
import subprocess
import sys

rc = subprocess.call(sys.argv[1:])
print(f"peak RSS: {resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024:.1f} MiB", file=sys.stderr)
sys.exit(rc)
