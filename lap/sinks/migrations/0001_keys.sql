-- Tenants and API keys. Only a SHA-256 hash of each token is stored.
CREATE TABLE tenants (
    name        text PRIMARY KEY CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$'),
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE api_keys (
    id          text PRIMARY KEY,
    tenant      text NOT NULL REFERENCES tenants (name),
    role        text NOT NULL CHECK (role IN ('sensor', 'reader', 'admin')),
    sensor      text,
    token_hash  bytea NOT NULL UNIQUE,
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz,
    CHECK (sensor IS NULL OR role = 'sensor')
);

CREATE INDEX api_keys_tenant ON api_keys (tenant);
