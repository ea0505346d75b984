CREATE TABLE "plans" (
   "tenant_id" TEXT PRIMARY KEY,
   "plan_json" TEXT NOT NULL,
   "updated_at_us" INTEGER NOT NULL
);
CREATE TABLE "contacts" (
   "tenant_id" TEXT,
   "contact_id" TEXT,
   "held" INTEGER NOT NULL,
   "marketing" INTEGER NOT NULL,
   "marketing_until_next_update" INTEGER NOT NULL,
   "marketing_source_type" TEXT DEFAULT '',
   "marketing_source_id" TEXT DEFAULT '',
   "updated_at_us" INTEGER NOT NULL, "marketing_until_us" INTEGER NOT NULL DEFAULT 0, "held_since_us" INTEGER NOT NULL DEFAULT 0,
   PRIMARY KEY ("tenant_id", "contact_id")
);
CREATE TABLE "usage" (
   "tenant_id" TEXT,
   "cycle_start_us" INTEGER,
   "active_contacts" INTEGER NOT NULL,
   "sends" INTEGER NOT NULL, "held_end" INTEGER NOT NULL DEFAULT 0, "held_peak" INTEGER NOT NULL DEFAULT 0, "marketing_end" INTEGER NOT NULL DEFAULT 0, "marketing_peak" INTEGER NOT NULL DEFAULT 0,
   PRIMARY KEY ("tenant_id", "cycle_start_us")
);
CREATE TABLE "request_results" (
   "tenant_id" TEXT,
   "rpc" TEXT,
   "request_id" TEXT,
   "cycle_start_us" INTEGER NOT NULL,
   "fingerprint" TEXT NOT NULL,
   "response_json" TEXT NOT NULL,
   "created_at_us" INTEGER NOT NULL,
   PRIMARY KEY ("tenant_id", "rpc", "request_id")
);
CREATE TABLE "audit" (
   "seq" INTEGER PRIMARY KEY,
   "at_us" INTEGER NOT NULL,
   "tenant_id" TEXT NOT NULL,
   "cycle_start_us" INTEGER NOT NULL,
   "rpc" TEXT NOT NULL,
   "request_id" TEXT,
   "contact_id" TEXT,
   "decision" TEXT NOT NULL,
   "reason" TEXT NOT NULL,
   "active_delta" INTEGER,
   "sends_delta" INTEGER,
   "held_delta" INTEGER
);
CREATE INDEX "idx_audit_tenant_id_cycle_start_us"
    ON "audit" ("tenant_id", "cycle_start_us");
CREATE TABLE "holdings" (
   "tenant_id" TEXT PRIMARY KEY,
   "cycle_start_us" INTEGER NOT NULL,
   "held" INTEGER NOT NULL,
   "marketing" INTEGER NOT NULL,
   "pending" INTEGER NOT NULL
);
CREATE TABLE "plan_versions" (
   "tenant_id" TEXT,
   "effective_us" INTEGER,
   "plan_json" TEXT NOT NULL,
   PRIMARY KEY ("tenant_id", "effective_us")
);
CREATE TABLE "notices" (
   "tenant_id" TEXT,
   "figure" INTEGER,
   "level" REAL NOT NULL,
   "cycle_start_us" INTEGER NOT NULL,
   "last_at_us" INTEGER NOT NULL,
   PRIMARY KEY ("tenant_id", "figure")
);
CREATE TABLE usage_events (seq INTEGER PRIMARY KEY AUTOINCREMENT, event_id TEXT NOT NULL UNIQUE, at_us INTEGER NOT NULL, tenant_id TEXT NOT NULL, type INTEGER NOT NULL, figure INTEGER NOT NULL, threshold REAL NOT NULL, usage_json TEXT NOT NULL);
CREATE INDEX usage_events_tenant ON usage_events (tenant_id, seq);
CREATE TABLE "event_cursors" (
   "consumer" TEXT PRIMARY KEY,
   "seq" INTEGER NOT NULL
);
CREATE TABLE cycle_keys (cycle_key INTEGER PRIMARY KEY, tenant_id TEXT NOT NULL, cycle_start_us INTEGER NOT NULL, UNIQUE (tenant_id, cycle_start_us));
CREATE TABLE activity_names (code INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE);
CREATE TABLE cycle_activations (cycle_key INTEGER NOT NULL, contact_id TEXT NOT NULL, activated_after_us INTEGER NOT NULL, activity INTEGER NOT NULL, sends INTEGER NOT NULL, PRIMARY KEY (cycle_key, contact_id)) WITHOUT ROWID;
CREATE VIEW activations AS SELECT k.tenant_id, k.cycle_start_us, a.contact_id, k.cycle_start_us + a.activated_after_us AS activated_at_us, n.name AS activity, a.sends FROM cycle_activations a JOIN cycle_keys k ON k.cycle_key = a.cycle_key JOIN activity_names n ON n.code = a.activity;
CREATE TABLE ledger_checks (id INTEGER PRIMARY KEY CHECK (id = 1), checked_at_us INTEGER NOT NULL);
