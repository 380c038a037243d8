//! The tables, as versioned migrations embedded in the binary and applied at start: a database
//! at an older version is brought up to this one (each step in its own transaction, the version
//! moved with it); one at a newer version than this binary knows is refused, never written to.

use postgres::Client;

/// The migrations, in order: migration `i` brings the schema from version `i` to `i + 1`.
pub const MIGRATIONS: &[&str] = &[
    // 1: everything a store holds.
    r#"
    CREATE TABLE ordo_convs (
        id text PRIMARY KEY,
        kind text NOT NULL,
        max_seq bigint NOT NULL,
        first_seq bigint NOT NULL,
        deleted boolean NOT NULL DEFAULT false,
        -- The whole record (members, retention, name, metadata) as JSON; the seq range is in
        -- the columns, which positions move without rewriting the record.
        record text NOT NULL
    );
    -- The groups alone, in id order, for the admin API's list: never a walk over the direct
    -- conversations.
    CREATE INDEX ordo_groups ON ordo_convs (id) WHERE kind = 'group' AND NOT deleted;
    -- Which conversations a user is a member of: the index of `convs` overviews.
    CREATE TABLE ordo_members (
        user_id text NOT NULL,
        conv text NOT NULL,
        PRIMARY KEY (user_id, conv)
    );
    CREATE INDEX ordo_members_by_conv ON ordo_members (conv);
    -- One row per message: (conv, seq) is unique, so a history can never fork.
    CREATE TABLE ordo_messages (
        conv text NOT NULL,
        seq bigint NOT NULL,
        from_user text NOT NULL,
        device text NOT NULL,
        cmid text NOT NULL,
        body text NOT NULL,
        reply_to bigint,
        ts bigint NOT NULL,
        event text,
        PRIMARY KEY (conv, seq)
    );
    CREATE TABLE ordo_cursors (
        conv text NOT NULL,
        user_id text NOT NULL,
        device text NOT NULL,
        delivered bigint NOT NULL,
        read bigint NOT NULL,
        PRIMARY KEY (conv, user_id, device)
    );
    -- What each (user, client message id) was accepted as, and in acceptance order (the
    -- filter's rebuild, and expiry by time).
    CREATE TABLE ordo_dedup (
        user_id text NOT NULL,
        cmid text NOT NULL,
        conv text NOT NULL,
        seq bigint NOT NULL,
        ts bigint NOT NULL,
        PRIMARY KEY (user_id, cmid)
    );
    CREATE INDEX ordo_dedup_by_time ON ordo_dedup (ts, user_id, cmid);
    -- Settings the store keeps for itself (the dedup expiry's cutoff).
    CREATE TABLE ordo_state (
        key text PRIMARY KEY,
        value bigint NOT NULL
    );
    "#,
    // 2: each writer's last batch, so that the outcome of a commit whose answer was lost (the
    // connection broke during COMMIT) is read back rather than guessed.
    r#"
    CREATE TABLE ordo_writers (
        id text PRIMARY KEY,
        batch bigint NOT NULL,
        updated timestamptz NOT NULL
    );
    "#,
    // 3: bodies as bytes (a body may hold any character, NUL among them, which text cannot),
    // and ids compared byte by byte: the order the embedded store lists them in, and cheaper
    // than a locale's rules.
    r#"
    ALTER TABLE ordo_messages
        ALTER COLUMN body TYPE bytea USING convert_to(body, 'UTF8'),
        ALTER COLUMN conv TYPE text COLLATE "C",
        ALTER COLUMN from_user TYPE text COLLATE "C",
        ALTER COLUMN device TYPE text COLLATE "C",
        ALTER COLUMN cmid TYPE text COLLATE "C";
    ALTER TABLE ordo_dedup
        ALTER COLUMN user_id TYPE text COLLATE "C",
        ALTER COLUMN cmid TYPE text COLLATE "C",
        ALTER COLUMN conv TYPE text COLLATE "C";
    ALTER TABLE ordo_convs ALTER COLUMN id TYPE text COLLATE "C";
    ALTER TABLE ordo_members
        ALTER COLUMN user_id TYPE text COLLATE "C",
        ALTER COLUMN conv TYPE text COLLATE "C";
    ALTER TABLE ordo_cursors
        ALTER COLUMN conv TYPE text COLLATE "C",
        ALTER COLUMN user_id TYPE text COLLATE "C",
        ALTER COLUMN device TYPE text COLLATE "C";
    ALTER TABLE ordo_writers ALTER COLUMN id TYPE text COLLATE "C";
    "#,
    // 4: a message is its own dedup entry, found by sender and client message id, and listed
    // in acceptance order; `ordo_dedup` keeps only entries whose message is gone (trimmed
    // within the dedup window) or that were written on their own. The newest acceptance time
    // is kept with the writers.
    r#"
    CREATE INDEX ordo_messages_by_sender ON ordo_messages (from_user, cmid);
    CREATE INDEX ordo_messages_by_time ON ordo_messages (ts);
    DELETE FROM ordo_dedup d USING ordo_messages m
     WHERE m.conv = d.conv AND m.seq = d.seq AND m.from_user = d.user_id AND m.cmid = d.cmid;
    ALTER TABLE ordo_writers ADD COLUMN last_ts bigint NOT NULL DEFAULT 0;
    "#,
    // 5: messages by time through a BRIN index (a summary per range of pages, nearly free to
    // keep up as messages are appended in time order) rather than a B-tree, which cost every
    // insert a fifth of its time; the dedup scan reads them in slices of time.
    r#"
    DROP INDEX ordo_messages_by_time;
    CREATE INDEX ordo_messages_by_time ON ordo_messages USING brin (ts) WITH (pages_per_range = 32);
    "#,
    // 6: the newest acceptance time of a store that step 4 migrated (it dropped the entries of
    // stored messages from ordo_dedup, where it was read from before), with the writers.
    r#"
    INSERT INTO ordo_writers (id, batch, updated, last_ts)
    SELECT 'migrated', 0, now(), COALESCE((SELECT MAX(ts) FROM ordo_messages), 0)
    ON CONFLICT (id) DO UPDATE SET last_ts = GREATEST(ordo_writers.last_ts, EXCLUDED.last_ts);
    "#,
    // 7: a commit moves its writer's row only from the attempt it follows, and is refused
    // whole otherwise: `held` is what the row holds after the commit's move. OR002: the row
    // is behind the attempt it follows (the database lost commits it confirmed); OR001: the
    // row moved past it (a read-back fenced it).
    //
    // `batch` is what the next attempt follows (an attempt's number, or a fence's);
    // `last_attempt` the last attempt that took effect, which a fence leaves as it is: a fence
    // reads it to settle the attempts before it, even when an earlier fence's answer was lost.
    r#"
    ALTER TABLE ordo_writers ADD COLUMN last_attempt bigint NOT NULL DEFAULT 0;
    CREATE FUNCTION ordo_follows(held bigint, follows bigint, attempt bigint) RETURNS bigint
    LANGUAGE plpgsql AS $$
    BEGIN
        IF held IS NULL THEN
            RAISE EXCEPTION 'ordo: commit attempt % found no row of its writer', attempt
                USING ERRCODE = 'OR001';
        ELSIF held = attempt THEN
            RETURN held;
        ELSIF held < follows THEN
            RAISE EXCEPTION 'ordo: commit attempt % follows attempt %, but the row holds only %', attempt, follows, held
                USING ERRCODE = 'OR002';
        ELSE
            RAISE EXCEPTION 'ordo: commit attempt % follows attempt %, but the row moved past it to %', attempt, follows, held
                USING ERRCODE = 'OR001';
        END IF;
    END $$;
    "#,
    // 8: a cluster's nodes and the leases of its partitions (see `lease.rs`). A node's row
    // says when it was last heard from; a lease row names the node holding a partition, its
    // fencing epoch (moved by every takeover) and when it runs out, by the database's clock.
    // `ordo_fenced` refuses a commit (OR003) unless the node still holds every partition it
    // writes to at the epoch it took it with: `held` is how many of the `wanted` lease rows
    // matched, locked against a takeover until the commit ends.
    r#"
    CREATE TABLE ordo_nodes (
        id text PRIMARY KEY,
        seen timestamptz NOT NULL,
        -- Where other nodes reach it, for the admin API's view (informational).
        info text NOT NULL DEFAULT ''
    );
    CREATE TABLE ordo_leases (
        part integer PRIMARY KEY,
        node text,
        epoch bigint NOT NULL DEFAULT 0,
        expires timestamptz NOT NULL DEFAULT '-infinity'
    );
    CREATE FUNCTION ordo_fenced(held bigint, wanted integer) RETURNS bigint
    LANGUAGE plpgsql AS $$
    BEGIN
        IF held <> wanted THEN
            RAISE EXCEPTION 'ordo: the commit writes to % partitions, but this node holds the lease of only % of them at the epoch it took them with', wanted, held
                USING ERRCODE = 'OR003';
        END IF;
        RETURN held;
    END $$;
    "#,
];

/// The schema version this binary writes.
pub fn current() -> i64 {
    MIGRATIONS.len() as i64
}

#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    #[error("the database's Ordo schema is version {found}, newer than this ordo knows ({known}): upgrade ordo, or point it at another database or schema")]
    Newer { found: i64, known: i64 },
    #[error("cannot apply the schema: {}", crate::text(.0))]
    Db(#[from] postgres::Error),
}

/// Brings the schema to [`current`]; returns the version found.
pub fn migrate(client: &mut Client) -> Result<i64, SchemaError> {
    migrate_to(client, current())
}

/// Brings the schema to version `target` (at most [`current`]; tests of an upgrade start from
/// an older one); returns the version found.
pub fn migrate_to(client: &mut Client, target: i64) -> Result<i64, SchemaError> {
    // Servers starting together (a cluster's nodes) take turns: even `CREATE TABLE IF NOT
    // EXISTS` fails for all but one of two sessions running it at once.
    client.batch_execute("SELECT pg_advisory_lock(7400001)")?;
    let result = migrate_locked(client, target);
    let unlocked = client.batch_execute("SELECT pg_advisory_unlock(7400001)");
    let found = result?;
    unlocked?;
    Ok(found)
}

fn migrate_locked(client: &mut Client, target: i64) -> Result<i64, SchemaError> {
    client.batch_execute(
        "CREATE TABLE IF NOT EXISTS ordo_schema (only_row boolean PRIMARY KEY DEFAULT true CHECK (only_row), version bigint NOT NULL);
         INSERT INTO ordo_schema (version) VALUES (0) ON CONFLICT DO NOTHING;",
    )?;
    let found: i64 = client
        .query_one("SELECT version FROM ordo_schema", &[])?
        .get(0);
    if found > current() {
        return Err(SchemaError::Newer {
            found,
            known: current(),
        });
    }
    let steps = MIGRATIONS.iter().take(target.clamp(0, current()) as usize);
    for (i, step) in steps.enumerate().skip(found as usize) {
        let mut tx = client.transaction()?;
        // Two servers starting at once: the second waits here, then finds the work done.
        let now: i64 = tx
            .query_one("SELECT version FROM ordo_schema FOR UPDATE", &[])?
            .get(0);
        if now > i as i64 {
            tx.commit()?;
            continue;
        }
        tx.batch_execute(step)?;
        tx.execute("UPDATE ordo_schema SET version = $1", &[&(i as i64 + 1)])?;
        tx.commit()?;
    }
    Ok(found)
}
