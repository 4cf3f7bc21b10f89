"""The broker over the network: an Arrow Flight endpoint, and federation between brokers.

`blobplane serve --flight grpc://HOST:PORT` serves the broker's sealed blobs
(and takes uploads) over Arrow Flight, beside its Unix socket (`service`,
with `bridge` between gRPC's threads and the broker's loop); `--peer URL`
names other brokers, from which a get by key that misses here is fetched
(`federation`). `client` is the blocking client both use, and the CLI's
``get --from`` and ``ls --peer``.

`address`, `config` and `tickets` import nothing heavy; the rest needs
pyarrow (the ``federation`` extra), and is imported only when a broker or a
command uses Flight.
"""
