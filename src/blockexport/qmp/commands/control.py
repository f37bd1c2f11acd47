"""Monitor control: version, introspection, quit."""
from blockexport.qmp.dispatcher import command, handlers


@command("qmp_capabilities")
def qmp_capabilities(daemon, args):
    # Negotiation is the monitor's (qmp/server.py); after it the monitor answers this itself.
    return {}


@command("query-version")
def query_version(daemon, args):
    return daemon.version_info()


@command("query-commands")
def query_commands(daemon, args):
    available = handlers()
    return [c for c in daemon.schema.query_commands() if c["name"] in available]


@command("query-qmp-schema")
def query_qmp_schema(daemon, args):
    return daemon.schema.introspect()


@command("quit")
def quit_(daemon, args):
    daemon.request_quit()
