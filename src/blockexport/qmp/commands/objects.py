"""object-add and object-del."""
from blockexport.qmp.dispatcher import command


@command("object-add")
def object_add(daemon, args):
    daemon.objects.add(args)


@command("object-del")
def object_del(daemon, args):
    daemon.objects.delete(args["id"])
