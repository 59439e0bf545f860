-- The state store's schema at revision 0010
-- Written by reconciler.state.lite.write_schema_script from a store Alembic made;
-- tests/test_state_lite.py fails when it differs from what the migrations make.
CREATE TABLE alembic_version (
	version_num VARCHAR(32) NOT NULL, 
	CONSTRAINT alembic_version_pkc PRIMARY KEY (version_num)
);
CREATE TABLE events (
	id INTEGER NOT NULL, 
	at DATETIME NOT NULL, 
	migration_id INTEGER, 
	address VARCHAR(320) NOT NULL, 
	step VARCHAR(16) NOT NULL, 
	from_state INTEGER, 
	to_state INTEGER, 
	detail TEXT NOT NULL, 
	specs_commit VARCHAR(64), 
	PRIMARY KEY (id)
);
CREATE INDEX ix_events_address ON events (address);
CREATE INDEX ix_events_at ON events (at);
CREATE INDEX ix_events_migration_id ON events (migration_id);
CREATE TABLE migrations (
	id INTEGER NOT NULL, 
	address VARCHAR(320) NOT NULL, 
	aliases JSON NOT NULL, 
	source_system VARCHAR(64) NOT NULL, 
	target_system VARCHAR(64) NOT NULL, 
	source_mailbox VARCHAR(320) NOT NULL, 
	target_mailbox VARCHAR(320) NOT NULL, 
	placement VARCHAR(128) NOT NULL, 
	window VARCHAR(128), 
	modes JSON NOT NULL, 
	station VARCHAR(128), 
	state INTEGER NOT NULL, 
	state_since DATETIME NOT NULL, 
	failed_reason TEXT, 
	failed_step VARCHAR(16), 
	address_migration_id VARCHAR(64), 
	hold_started_at DATETIME, 
	last_error TEXT, 
	next_attempt_at DATETIME, 
	attempts INTEGER NOT NULL, 
	mailbox_type VARCHAR(64), 
	mailbox_size INTEGER, 
	station_action VARCHAR(32), 
	station_action_since DATETIME, 
	suspended BOOLEAN NOT NULL, 
	purged BOOLEAN NOT NULL, 
	created_at DATETIME NOT NULL, error_since DATETIME, manual_step TEXT, 
	PRIMARY KEY (id)
);
CREATE INDEX ix_migrations_address ON migrations (address);
CREATE TABLE station_reports (
	id INTEGER NOT NULL, 
	station VARCHAR(128) NOT NULL, 
	address VARCHAR(320) NOT NULL, 
	migration_id INTEGER, 
	kind VARCHAR(32) NOT NULL, 
	ok BOOLEAN NOT NULL, 
	detail JSON NOT NULL, 
	report_id VARCHAR(64), 
	at DATETIME NOT NULL, 
	PRIMARY KEY (id), 
	UNIQUE (report_id)
);
CREATE INDEX ix_station_reports_address ON station_reports (address);
CREATE INDEX ix_station_reports_migration_id ON station_reports (migration_id);
CREATE INDEX ix_station_reports_station ON station_reports (station);
CREATE TABLE stations (
	name VARCHAR(128) NOT NULL, 
	address VARCHAR(320) NOT NULL, 
	token_sha256 VARCHAR(64) NOT NULL, 
	created_at DATETIME NOT NULL, 
	last_seen DATETIME, 
	PRIMARY KEY (name)
);
CREATE INDEX ix_stations_address ON stations (address);
CREATE TABLE transfer_manifest (
	id INTEGER NOT NULL, 
	migration_id INTEGER NOT NULL, 
	folder VARCHAR(512) NOT NULL, 
	sha256 VARCHAR(64) NOT NULL, 
	size INTEGER NOT NULL, 
	message_id VARCHAR(998), 
	copied BOOLEAN NOT NULL, 
	at DATETIME NOT NULL, mailbox VARCHAR(320), src_validity VARCHAR(64), src_uid VARCHAR(255), dst_folder VARCHAR(512), dst_validity VARCHAR(64), dst_uid VARCHAR(255), dst_sha256 VARCHAR(64), proof VARCHAR(64), proof_note VARCHAR(512), 
	PRIMARY KEY (id)
);
CREATE INDEX ix_manifest_migration_folder ON transfer_manifest (migration_id, folder);
CREATE TABLE transfer_runs (
	id INTEGER NOT NULL, 
	migration_id INTEGER NOT NULL, 
	copied INTEGER NOT NULL, 
	present INTEGER NOT NULL, 
	failed INTEGER NOT NULL, 
	bytes_copied INTEGER NOT NULL, 
	seconds FLOAT NOT NULL, 
	verified BOOLEAN NOT NULL, 
	at DATETIME NOT NULL, mailbox VARCHAR(320), phase VARCHAR(16), messages_total INTEGER, bytes_total BIGINT, missing INTEGER, report TEXT, 
	PRIMARY KEY (id)
);
CREATE INDEX ix_transfer_runs_migration_id ON transfer_runs (migration_id);
CREATE TABLE leases (
	name VARCHAR(64) NOT NULL, 
	holder VARCHAR(255) NOT NULL, 
	acquired_at DATETIME NOT NULL, 
	renewed_at DATETIME NOT NULL, 
	expires_at DATETIME NOT NULL, generation BIGINT DEFAULT '0' NOT NULL, fence_id VARCHAR(64) DEFAULT '' NOT NULL, 
	PRIMARY KEY (name)
);
CREATE TABLE placement_suspensions (
	placement VARCHAR(128) NOT NULL, 
	since DATETIME NOT NULL, 
	"by" VARCHAR(255) NOT NULL, 
	reason TEXT NOT NULL, 
	PRIMARY KEY (placement)
);
CREATE TABLE wave_reports (
	id INTEGER NOT NULL, 
	placement VARCHAR(128) NOT NULL, 
	last_migration_id INTEGER NOT NULL, 
	path TEXT NOT NULL, 
	mailed_to TEXT NOT NULL, 
	at DATETIME NOT NULL, 
	PRIMARY KEY (id)
);
CREATE INDEX ix_wave_reports_placement ON wave_reports (placement);
CREATE INDEX ix_manifest_mailbox_folder ON transfer_manifest (mailbox, folder);
CREATE TABLE address_errors (
	address VARCHAR(320) NOT NULL, 
	step VARCHAR(16) NOT NULL, 
	attempts INTEGER NOT NULL, 
	error_since DATETIME NOT NULL, 
	next_attempt_at DATETIME, 
	last_error TEXT NOT NULL, 
	failed_reason TEXT, manual_step TEXT, 
	PRIMARY KEY (address)
);
CREATE TABLE data_jobs (
	id INTEGER NOT NULL, 
	migration_id INTEGER NOT NULL, 
	step VARCHAR(16) NOT NULL, 
	state INTEGER NOT NULL, 
	address VARCHAR(320) NOT NULL, 
	status VARCHAR(16) NOT NULL, 
	job_id BIGINT, 
	worker VARCHAR(255), 
	attempts INTEGER NOT NULL, 
	enqueued_at DATETIME NOT NULL, 
	started_at DATETIME, 
	finished_at DATETIME, 
	result JSON, 
	PRIMARY KEY (id)
);
CREATE UNIQUE INDEX ux_data_jobs_step ON data_jobs (migration_id, step, state);
CREATE TABLE system_pace (
	system VARCHAR(128) NOT NULL, 
	tat DATETIME NOT NULL, 
	strikes INTEGER NOT NULL, 
	struck_at DATETIME, 
	reason TEXT NOT NULL, 
	PRIMARY KEY (system)
);
CREATE TABLE data_workers (
	name VARCHAR(255) NOT NULL, 
	host VARCHAR(255) NOT NULL, 
	pid INTEGER NOT NULL, 
	concurrency INTEGER NOT NULL, 
	heartbeat FLOAT NOT NULL, 
	stalled FLOAT NOT NULL, 
	started_at DATETIME NOT NULL, 
	last_seen DATETIME NOT NULL, 
	PRIMARY KEY (name)
);
INSERT INTO alembic_version (version_num) VALUES ('0010');
