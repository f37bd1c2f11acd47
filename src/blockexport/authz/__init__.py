"""Authorization (layer 4): QEMU's authz-simple, authz-list and authz-listfile rules.  An
authorizer has ``is_allowed(identity) -> bool`` and may raise ``blockexport.errors.Error``
(the caller then denies and logs the reason)."""
