-- A worklist database made by the pre-Alembic code (triage_core/worklist.py at commit 6683851,
-- schema version 1) with studies in every status, results, image results and deliveries,
-- dumped with sqlite3's iterdump. Restored by tests/core/test_worklist_migrations.py.
BEGIN TRANSACTION;
CREATE TABLE deliveries (
	id INTEGER NOT NULL, 
	study_uid VARCHAR(64) NOT NULL, 
	sop_uid VARCHAR(64) NOT NULL, 
	path TEXT NOT NULL, 
	destination VARCHAR(256) NOT NULL, 
	status VARCHAR(16) NOT NULL, 
	attempts INTEGER NOT NULL, 
	next_attempt_at DOUBLE NOT NULL, 
	last_error TEXT NOT NULL, 
	created_at DOUBLE NOT NULL, 
	updated_at DOUBLE NOT NULL, 
	sent_at DOUBLE, 
	PRIMARY KEY (id), 
	CONSTRAINT uq_deliveries_sop_destination UNIQUE (sop_uid, destination), 
	FOREIGN KEY(study_uid) REFERENCES studies (study_uid) ON DELETE CASCADE
);
INSERT INTO "deliveries" VALUES(1,'1.2.826.0.1.3680043.8.498.1.1','1.2.826.0.1.3680043.8.498.9.1','/outbox/sr1.dcm','PACS@127.0.0.1:11112','sent',1,1700000043.0,'',1700000012.0,1700000014.0,1700000014.0);
INSERT INTO "deliveries" VALUES(2,'1.2.826.0.1.3680043.8.498.1.1','1.2.826.0.1.3680043.8.498.9.2','/outbox/sc1.dcm','PACS@127.0.0.1:11112','pending',1,1700000044.0,'association refused',1700000012.0,1700000014.0,NULL);
CREATE TABLE image_results (
	id INTEGER NOT NULL, 
	study_uid VARCHAR(64) NOT NULL, 
	uid VARCHAR(256) NOT NULL, 
	eligible BOOLEAN NOT NULL, 
	reason TEXT NOT NULL, 
	probabilities TEXT NOT NULL, 
	error TEXT NOT NULL, 
	PRIMARY KEY (id), 
	CONSTRAINT uq_image_results_study_uid UNIQUE (study_uid, uid), 
	FOREIGN KEY(study_uid) REFERENCES studies (study_uid) ON DELETE CASCADE
);
INSERT INTO "image_results" VALUES(1,'1.2.826.0.1.3680043.8.498.1.1','1.2.826.0.1.3680043.8.498.2.1.1',1,'','{"Effusion": 0.8, "Atelectasis": 0.1}','');
INSERT INTO "image_results" VALUES(2,'1.2.826.0.1.3680043.8.498.1.1','1.2.826.0.1.3680043.8.498.2.1.2',0,'lateral view','{}','');
INSERT INTO "image_results" VALUES(3,'1.2.826.0.1.3680043.8.498.1.2','1.2.826.0.1.3680043.8.498.2.2.1',0,'not a chest X-ray','{}','');
CREATE TABLE instances (
	sop_uid VARCHAR(64) NOT NULL, 
	study_uid VARCHAR(64) NOT NULL, 
	series_uid VARCHAR(64) NOT NULL, 
	sop_class_uid VARCHAR(64) NOT NULL, 
	path TEXT NOT NULL, 
	received_at DOUBLE NOT NULL, 
	PRIMARY KEY (sop_uid), 
	FOREIGN KEY(study_uid) REFERENCES studies (study_uid) ON DELETE CASCADE
);
INSERT INTO "instances" VALUES('1.2.826.0.1.3680043.8.498.2.1.1','1.2.826.0.1.3680043.8.498.1.1','1.2.826.0.1.3680043.8.498.3.1','1.2.840.10008.5.1.4.1.1.1','/spool/1.2.826.0.1.3680043.8.498.1.1/1.2.826.0.1.3680043.8.498.2.1.1.dcm',1700000000.0);
INSERT INTO "instances" VALUES('1.2.826.0.1.3680043.8.498.2.2.1','1.2.826.0.1.3680043.8.498.1.2','1.2.826.0.1.3680043.8.498.3.2','1.2.840.10008.5.1.4.1.1.1','/spool/1.2.826.0.1.3680043.8.498.1.2/1.2.826.0.1.3680043.8.498.2.2.1.dcm',1700000000.0);
INSERT INTO "instances" VALUES('1.2.826.0.1.3680043.8.498.2.3.1','1.2.826.0.1.3680043.8.498.1.3','1.2.826.0.1.3680043.8.498.3.3','1.2.840.10008.5.1.4.1.1.1','/spool/1.2.826.0.1.3680043.8.498.1.3/1.2.826.0.1.3680043.8.498.2.3.1.dcm',1700000000.0);
INSERT INTO "instances" VALUES('1.2.826.0.1.3680043.8.498.2.4.1','1.2.826.0.1.3680043.8.498.1.4','1.2.826.0.1.3680043.8.498.3.4','1.2.840.10008.5.1.4.1.1.1','/spool/1.2.826.0.1.3680043.8.498.1.4/1.2.826.0.1.3680043.8.498.2.4.1.dcm',1700000000.0);
INSERT INTO "instances" VALUES('1.2.826.0.1.3680043.8.498.2.5.1','1.2.826.0.1.3680043.8.498.1.5','1.2.826.0.1.3680043.8.498.3.5','1.2.840.10008.5.1.4.1.1.1','/spool/1.2.826.0.1.3680043.8.498.1.5/1.2.826.0.1.3680043.8.498.2.5.1.dcm',1700000000.0);
INSERT INTO "instances" VALUES('1.2.826.0.1.3680043.8.498.2.1.2','1.2.826.0.1.3680043.8.498.1.1','','','/spool/1.2.826.0.1.3680043.8.498.1.1/1.2.826.0.1.3680043.8.498.2.1.2.dcm',1700000001.0);
INSERT INTO "instances" VALUES('1.2.826.0.1.3680043.8.498.2.6.1','1.2.826.0.1.3680043.8.498.1.6','','','/spool/1.2.826.0.1.3680043.8.498.1.6/1.2.826.0.1.3680043.8.498.2.6.1.dcm',1700000040.0);
CREATE TABLE results (
	id INTEGER NOT NULL, 
	study_uid VARCHAR(64) NOT NULL, 
	finding VARCHAR(64) NOT NULL, 
	probability DOUBLE NOT NULL, 
	present BOOLEAN NOT NULL, 
	threshold DOUBLE NOT NULL, 
	source_uid VARCHAR(256) NOT NULL, 
	PRIMARY KEY (id), 
	CONSTRAINT uq_results_study_finding UNIQUE (study_uid, finding), 
	FOREIGN KEY(study_uid) REFERENCES studies (study_uid) ON DELETE CASCADE
);
INSERT INTO "results" VALUES(1,'1.2.826.0.1.3680043.8.498.1.1','Effusion',0.8,1,0.5,'1.2.826.0.1.3680043.8.498.2.1.1');
INSERT INTO "results" VALUES(2,'1.2.826.0.1.3680043.8.498.1.1','Atelectasis',0.1,0,0.5,'1.2.826.0.1.3680043.8.498.2.1.1');
CREATE TABLE studies (
	id INTEGER NOT NULL, 
	study_uid VARCHAR(64) NOT NULL, 
	status VARCHAR(16) NOT NULL, 
	reason TEXT NOT NULL, 
	error TEXT NOT NULL, 
	accession_hash VARCHAR(64) NOT NULL, 
	received_at DOUBLE NOT NULL, 
	last_instance_at DOUBLE NOT NULL, 
	queued_at DOUBLE, 
	updated_at DOUBLE NOT NULL, 
	completed_at DOUBLE, 
	attempts INTEGER NOT NULL, 
	lease_owner VARCHAR(128), 
	lease_expires_at DOUBLE, 
	rerun BOOLEAN NOT NULL, 
	priority_score DOUBLE, 
	priority_level VARCHAR(16), 
	model_name VARCHAR(128) NOT NULL, 
	model_version VARCHAR(64) NOT NULL, 
	timings TEXT NOT NULL, 
	PRIMARY KEY (id), 
	UNIQUE (study_uid)
);
INSERT INTO "studies" VALUES(1,'1.2.826.0.1.3680043.8.498.1.1','done','','','b1d756e486c83e81',1700000000.0,1700000001.0,1700000010.0,1700000012.0,1700000012.0,1,NULL,NULL,0,80.0,'urgent','random-test-model','0','{"inference": 0.02}');
INSERT INTO "studies" VALUES(2,'1.2.826.0.1.3680043.8.498.1.2','not_eligible','no frontal chest image','','3741dbeefa7333be',1700000000.0,1700000000.0,1700000010.0,1700000021.0,1700000021.0,1,NULL,NULL,0,0.0,'routine','random-test-model','0','{}');
INSERT INTO "studies" VALUES(3,'1.2.826.0.1.3680043.8.498.1.3','processing','','','d1aee14ae76cc81c',1700000000.0,1700000000.0,1700000010.0,1700000030.0,NULL,1,'host:2:w1',1700000090.0,0,NULL,NULL,'','','{}');
INSERT INTO "studies" VALUES(4,'1.2.826.0.1.3680043.8.498.1.4','failed','','transient','e0c41b07cadc3268',1700000000.0,1700000000.0,1700000010.0,1700000034.0,NULL,2,NULL,NULL,0,NULL,NULL,'','','{}');
INSERT INTO "studies" VALUES(5,'1.2.826.0.1.3680043.8.498.1.5','queued','','transient','dc5d79827c8d8c1f',1700000000.0,1700000000.0,1700000010.0,1700000036.0,NULL,1,NULL,NULL,0,NULL,NULL,'','','{}');
INSERT INTO "studies" VALUES(6,'1.2.826.0.1.3680043.8.498.1.6','receiving','','','',1700000040.0,1700000040.0,NULL,1700000040.0,NULL,0,NULL,NULL,0,NULL,NULL,'','','{}');
CREATE TABLE worklist_meta (
	"key" VARCHAR(64) NOT NULL, 
	value TEXT NOT NULL, 
	PRIMARY KEY ("key")
);
INSERT INTO "worklist_meta" VALUES('schema_version','1');
CREATE INDEX ix_studies_status_received ON studies (status, received_at);
CREATE INDEX ix_studies_status_lease ON studies (status, lease_expires_at);
CREATE INDEX ix_instances_study ON instances (study_uid);
CREATE INDEX ix_deliveries_status_next ON deliveries (status, next_attempt_at);
CREATE INDEX ix_deliveries_study ON deliveries (study_uid);
COMMIT;
