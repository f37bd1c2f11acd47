"""GNU ``getopt_long`` emulation shared by the command lines (glibc's semantics and messages).

Long options are ``(name, has_arg, val)`` tuples in the program's table order (the order shows
in "ambiguous" messages); short options are a glibc option string.  Supported: unambiguous
abbreviations of long options (several matches with the same ``has_arg``/``val`` are not
ambiguous, as in glibc), ``--opt=value``, clusters of short options (``-rvT x``, ``-Tx``),
``--`` and glibc's operand orderings:

* default: PERMUTE, operands are collected in ``operands`` and the scan goes on
  (REQUIRE_ORDER instead when ``POSIXLY_CORRECT``: the first operand ends the scan);
* a leading ``-`` in the short options: RETURN_IN_ORDER, each operand is yielded in place as
  ``(OPERAND, arg, arg)`` (glibc returns 1 for it).

``--`` ends the scan; what follows it goes to ``operands`` when a list is given.  On an error
:class:`GetoptError` carries glibc's message, prefixed with ``argv0``.
"""
from __future__ import annotations

import os

NO_ARG, REQUIRED_ARG = 0, 1
OPERAND = "\x01"


class GetoptError(Exception):
    pass


def _long_option(longopts, body: str, argv0: str):
    name = body.partition("=")[0]
    exact = [o for o in longopts if o[0] == name]
    if exact:
        return exact[0]
    matches = [o for o in longopts if o[0].startswith(name)]
    if not matches:
        raise GetoptError("%s: unrecognized option '--%s'" % (argv0, body))
    first = matches[0]
    if any(o[1:] != first[1:] for o in matches[1:]):
        raise GetoptError("%s: option '--%s' is ambiguous; possibilities:%s"
                          % (argv0, body, "".join(" '--%s'" % o[0] for o in matches)))
    return first


def getopt_long_located(args, shortopts: str, longopts, argv0: str, operands: list | None = None,
                        posixly_correct: bool | None = None):
    """Yield ``(val, optarg, loc)`` in command-line order; ``loc`` is the option's argv text
    as typed (``"--opt=v"``, ``"-Tx"``, or ``"--opt v"`` / ``"-T v"`` when the argument is
    the next element), which QEMU prints as the error location."""
    in_order = shortopts.startswith("-")
    if in_order:
        shortopts = shortopts[1:]
    elif posixly_correct is None:
        posixly_correct = "POSIXLY_CORRECT" in os.environ
    if operands is None:
        operands = []
    i, n = 0, len(args)
    while i < n:
        arg = args[i]
        i += 1
        if arg == "--":
            operands.extend(args[i:])
            return
        if not arg.startswith("-") or arg == "-":
            if in_order:
                yield OPERAND, arg, arg
                continue
            operands.append(arg)
            if posixly_correct:
                operands.extend(args[i:])
                return
            continue
        if arg.startswith("--"):
            body = arg[2:]
            lname, has_arg, val = _long_option(longopts, body, argv0)
            if "=" in body:
                if has_arg == NO_ARG:
                    raise GetoptError("%s: option '--%s' doesn't allow an argument"
                                      % (argv0, lname))
                yield val, body.partition("=")[2], arg
            elif has_arg == REQUIRED_ARG:
                if i >= n:
                    raise GetoptError("%s: option '--%s' requires an argument" % (argv0, lname))
                i += 1
                yield val, args[i - 1], "%s %s" % (arg, args[i - 1])
            else:
                yield val, None, arg
            continue
        # a cluster of short options
        j = 1
        while j < len(arg):
            c = arg[j]
            j += 1
            k = shortopts.find(c)
            if c == ":" or k < 0:
                raise GetoptError("%s: invalid option -- '%s'" % (argv0, c))
            if shortopts[k + 1:k + 2] == ":":
                if j < len(arg):
                    yield c, arg[j:], arg
                elif i < n:
                    i += 1
                    yield c, args[i - 1], "%s %s" % (arg, args[i - 1])
                else:
                    raise GetoptError("%s: option requires an argument -- '%s'" % (argv0, c))
                break
            yield c, None, arg


def getopt_long(args, shortopts: str, longopts, argv0: str, operands: list | None = None,
                posixly_correct: bool | None = None):
    """Yield ``(val, optarg)`` pairs: :func:`getopt_long_located` without the locations."""
    for val, optarg, _ in getopt_long_located(args, shortopts, longopts, argv0, operands,
                                              posixly_correct):
        yield val, optarg
