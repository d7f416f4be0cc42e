"""The datastore: etcd key schema (:mod:`.keys`), the client adapter (:mod:`.client`) and the
snapshot-then-watch syncer (:mod:`.syncer`)."""
