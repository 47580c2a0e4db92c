"""fastlm: a fast word-level LSTM language model for Penn Treebank, with a fused LSTM kernel in Triton."""
import os
import signal
import sys


def _interrupted_while_starting(signum, frame):
    sys.stderr.write("interrupted\n")
    os._exit(130)  # no traceback from half-imported modules; fastlm.cli.run_main restores Ctrl-C


# `python -m fastlm.<verb>` (sys.argv[0] is "-m" while its package imports): a Ctrl-C during the
# seconds torch takes to import ends the program quietly. A program importing fastlm keeps its own.
if sys.argv[:1] == ["-m"] and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    signal.signal(signal.SIGINT, _interrupted_while_starting)
