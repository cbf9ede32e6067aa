"""Private record linkage with an encrypted cross-tab, over raw TCP.

The phases, in the order a session runs them, each a module with a docstring
that says what crosses the wire and who learns what: :mod:`.handshake`,
:mod:`.linkage`, :mod:`.threshold`, :mod:`.crosstab`. The plaintext pieces
they share are :mod:`.encoding`, :mod:`.layout` and :mod:`.table`;
:mod:`.reference` is the same rule without encryption, for tests and
benchmarks.
"""

__version__ = "0.1.0"
