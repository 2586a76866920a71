-- The ledger is append-only: no UPDATE, DELETE or TRUNCATE, whoever asks.
CREATE FUNCTION ledger_entries_refuse_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'ledger_entries is append-only: % refused', TG_OP
        USING ERRCODE = 'P0001';
END $$;

CREATE TRIGGER ledger_entries_append_only
    BEFORE UPDATE OR DELETE ON ledger_entries
    FOR EACH ROW EXECUTE FUNCTION ledger_entries_refuse_change();

CREATE TRIGGER ledger_entries_no_truncate
    BEFORE TRUNCATE ON ledger_entries
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_entries_refuse_change();

-- Each entry continues its org's chain: balance_after = previous balance_after + amount, and
-- the same for debt. Rows inserted earlier by the same statement are visible here, so a batch
-- insert is checked row by row.
CREATE FUNCTION ledger_entries_check_chain() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    previous record;
    balance_before bigint := 0;
    debt_before bigint := 0;
BEGIN
    SELECT balance_after_pence, debt_after_pence INTO previous
        FROM ledger_entries WHERE org_id = NEW.org_id ORDER BY id DESC LIMIT 1;
    IF FOUND THEN
        balance_before := previous.balance_after_pence;
        debt_before := previous.debt_after_pence;
    END IF;
    IF NEW.balance_after_pence <> balance_before + NEW.amount_pence
       OR NEW.debt_after_pence <> debt_before + NEW.debt_delta_pence THEN
        RAISE EXCEPTION 'ledger entry % of org % breaks the chain: balance % + % <> %, debt % + % <> %',
            NEW.idempotency_key, NEW.org_id,
            balance_before, NEW.amount_pence, NEW.balance_after_pence,
            debt_before, NEW.debt_delta_pence, NEW.debt_after_pence
            USING ERRCODE = '23514';
    END IF;
    RETURN NEW;
END $$;

CREATE TRIGGER ledger_entries_chain
    BEFORE INSERT ON ledger_entries
    FOR EACH ROW EXECUTE FUNCTION ledger_entries_check_chain();

-- At COMMIT, the org's projection equals its last ledger entry: the projection is updated in
-- the same transaction as every insert, or the transaction fails.
CREATE FUNCTION ledger_entries_check_projection() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    projection record;
    last_entry record;
BEGIN
    SELECT balance_pence, debt_pence, last_entry_id INTO projection
        FROM org_balances WHERE org_id = NEW.org_id;
    SELECT id, balance_after_pence, debt_after_pence INTO last_entry
        FROM ledger_entries WHERE org_id = NEW.org_id ORDER BY id DESC LIMIT 1;
    IF projection IS NULL
       OR projection.last_entry_id IS DISTINCT FROM last_entry.id
       OR projection.balance_pence <> last_entry.balance_after_pence
       OR projection.debt_pence <> last_entry.debt_after_pence THEN
        RAISE EXCEPTION 'org % projection does not match its last ledger entry', NEW.org_id
            USING ERRCODE = '23514';
    END IF;
    RETURN NULL;
END $$;

CREATE CONSTRAINT TRIGGER ledger_entries_projection_matches
    AFTER INSERT ON ledger_entries
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW EXECUTE FUNCTION ledger_entries_check_projection();
