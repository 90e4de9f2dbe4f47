-- The same worklist as worklist_v1.sql, made on PostgreSQL by the pre-Alembic code
-- (triage_core/worklist.py at commit 6683851, schema version 1), dumped with
-- pg_dump --inserts --no-owner --no-privileges (psql meta-commands removed).
--
-- PostgreSQL database dump
--

-- Dumped from database version 15.18 (Debian 15.18-0+deb12u1)
-- Dumped by pg_dump version 15.18 (Debian 15.18-0+deb12u1)

SET statement_timeout = 0;
SET lock_timeout = 0;
SET idle_in_transaction_session_timeout = 0;
SET client_encoding = 'UTF8';
SET standard_conforming_strings = on;
SELECT pg_catalog.set_config('search_path', '', false);
SET check_function_bodies = false;
SET xmloption = content;
SET client_min_messages = warning;
SET row_security = off;

SET default_tablespace = '';

SET default_table_access_method = heap;

--
-- Name: deliveries; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.deliveries (
    id integer NOT NULL,
    study_uid character varying(64) NOT NULL,
    sop_uid character varying(64) NOT NULL,
    path text NOT NULL,
    destination character varying(256) NOT NULL,
    status character varying(16) NOT NULL,
    attempts integer NOT NULL,
    next_attempt_at double precision NOT NULL,
    last_error text NOT NULL,
    created_at double precision NOT NULL,
    updated_at double precision NOT NULL,
    sent_at double precision
);

--
-- Name: deliveries_id_seq; Type: SEQUENCE; Schema: public; Owner: -
--

CREATE SEQUENCE public.deliveries_id_seq
    AS integer
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1;

--
-- Name: deliveries_id_seq; Type: SEQUENCE OWNED BY; Schema: public; Owner: -
--

ALTER SEQUENCE public.deliveries_id_seq OWNED BY public.deliveries.id;

--
-- Name: image_results; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.image_results (
    id integer NOT NULL,
    study_uid character varying(64) NOT NULL,
    uid character varying(256) NOT NULL,
    eligible boolean NOT NULL,
    reason text NOT NULL,
    probabilities text NOT NULL,
    error text NOT NULL
);

--
-- Name: image_results_id_seq; Type: SEQUENCE; Schema: public; Owner: -
--

CREATE SEQUENCE public.image_results_id_seq
    AS integer
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1;

--
-- Name: image_results_id_seq; Type: SEQUENCE OWNED BY; Schema: public; Owner: -
--

ALTER SEQUENCE public.image_results_id_seq OWNED BY public.image_results.id;

--
-- Name: instances; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.instances (
    sop_uid character varying(64) NOT NULL,
    study_uid character varying(64) NOT NULL,
    series_uid character varying(64) NOT NULL,
    sop_class_uid character varying(64) NOT NULL,
    path text NOT NULL,
    received_at double precision NOT NULL
);

--
-- Name: results; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.results (
    id integer NOT NULL,
    study_uid character varying(64) NOT NULL,
    finding character varying(64) NOT NULL,
    probability double precision NOT NULL,
    present boolean NOT NULL,
    threshold double precision NOT NULL,
    source_uid character varying(256) NOT NULL
);

--
-- Name: results_id_seq; Type: SEQUENCE; Schema: public; Owner: -
--

CREATE SEQUENCE public.results_id_seq
    AS integer
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1;

--
-- Name: results_id_seq; Type: SEQUENCE OWNED BY; Schema: public; Owner: -
--

ALTER SEQUENCE public.results_id_seq OWNED BY public.results.id;

--
-- Name: studies; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.studies (
    id integer NOT NULL,
    study_uid character varying(64) NOT NULL,
    status character varying(16) NOT NULL,
    reason text NOT NULL,
    error text NOT NULL,
    accession_hash character varying(64) NOT NULL,
    received_at double precision NOT NULL,
    last_instance_at double precision NOT NULL,
    queued_at double precision,
    updated_at double precision NOT NULL,
    completed_at double precision,
    attempts integer NOT NULL,
    lease_owner character varying(128),
    lease_expires_at double precision,
    rerun boolean NOT NULL,
    priority_score double precision,
    priority_level character varying(16),
    model_name character varying(128) NOT NULL,
    model_version character varying(64) NOT NULL,
    timings text NOT NULL
);

--
-- Name: studies_id_seq; Type: SEQUENCE; Schema: public; Owner: -
--

CREATE SEQUENCE public.studies_id_seq
    AS integer
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1;

--
-- Name: studies_id_seq; Type: SEQUENCE OWNED BY; Schema: public; Owner: -
--

ALTER SEQUENCE public.studies_id_seq OWNED BY public.studies.id;

--
-- Name: worklist_meta; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.worklist_meta (
    key character varying(64) NOT NULL,
    value text NOT NULL
);

--
-- Name: deliveries id; Type: DEFAULT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.deliveries ALTER COLUMN id SET DEFAULT nextval('public.deliveries_id_seq'::regclass);

--
-- Name: image_results id; Type: DEFAULT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.image_results ALTER COLUMN id SET DEFAULT nextval('public.image_results_id_seq'::regclass);

--
-- Name: results id; Type: DEFAULT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.results ALTER COLUMN id SET DEFAULT nextval('public.results_id_seq'::regclass);

--
-- Name: studies id; Type: DEFAULT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.studies ALTER COLUMN id SET DEFAULT nextval('public.studies_id_seq'::regclass);

--
-- Data for Name: deliveries; Type: TABLE DATA; Schema: public; Owner: -
--

INSERT INTO public.deliveries VALUES (1, '1.2.826.0.1.3680043.8.498.1.1', '1.2.826.0.1.3680043.8.498.9.1', '/outbox/sr1.dcm', 'PACS@127.0.0.1:11112', 'sent', 1, 1700000043, '', 1700000012, 1700000014, 1700000014);
INSERT INTO public.deliveries VALUES (2, '1.2.826.0.1.3680043.8.498.1.1', '1.2.826.0.1.3680043.8.498.9.2', '/outbox/sc1.dcm', 'PACS@127.0.0.1:11112', 'pending', 1, 1700000044, 'association refused', 1700000012, 1700000014, NULL);

--
-- Data for Name: image_results; Type: TABLE DATA; Schema: public; Owner: -
--

INSERT INTO public.image_results VALUES (1, '1.2.826.0.1.3680043.8.498.1.1', '1.2.826.0.1.3680043.8.498.2.1.1', true, '', '{"Effusion": 0.8, "Atelectasis": 0.1}', '');
INSERT INTO public.image_results VALUES (2, '1.2.826.0.1.3680043.8.498.1.1', '1.2.826.0.1.3680043.8.498.2.1.2', false, 'lateral view', '{}', '');
INSERT INTO public.image_results VALUES (3, '1.2.826.0.1.3680043.8.498.1.2', '1.2.826.0.1.3680043.8.498.2.2.1', false, 'not a chest X-ray', '{}', '');

--
-- Data for Name: instances; Type: TABLE DATA; Schema: public; Owner: -
--

INSERT INTO public.instances VALUES ('1.2.826.0.1.3680043.8.498.2.1.1', '1.2.826.0.1.3680043.8.498.1.1', '1.2.826.0.1.3680043.8.498.3.1', '1.2.840.10008.5.1.4.1.1.1', '/spool/1.2.826.0.1.3680043.8.498.1.1/1.2.826.0.1.3680043.8.498.2.1.1.dcm', 1700000000);
INSERT INTO public.instances VALUES ('1.2.826.0.1.3680043.8.498.2.2.1', '1.2.826.0.1.3680043.8.498.1.2', '1.2.826.0.1.3680043.8.498.3.2', '1.2.840.10008.5.1.4.1.1.1', '/spool/1.2.826.0.1.3680043.8.498.1.2/1.2.826.0.1.3680043.8.498.2.2.1.dcm', 1700000000);
INSERT INTO public.instances VALUES ('1.2.826.0.1.3680043.8.498.2.3.1', '1.2.826.0.1.3680043.8.498.1.3', '1.2.826.0.1.3680043.8.498.3.3', '1.2.840.10008.5.1.4.1.1.1', '/spool/1.2.826.0.1.3680043.8.498.1.3/1.2.826.0.1.3680043.8.498.2.3.1.dcm', 1700000000);
INSERT INTO public.instances VALUES ('1.2.826.0.1.3680043.8.498.2.4.1', '1.2.826.0.1.3680043.8.498.1.4', '1.2.826.0.1.3680043.8.498.3.4', '1.2.840.10008.5.1.4.1.1.1', '/spool/1.2.826.0.1.3680043.8.498.1.4/1.2.826.0.1.3680043.8.498.2.4.1.dcm', 1700000000);
INSERT INTO public.instances VALUES ('1.2.826.0.1.3680043.8.498.2.5.1', '1.2.826.0.1.3680043.8.498.1.5', '1.2.826.0.1.3680043.8.498.3.5', '1.2.840.10008.5.1.4.1.1.1', '/spool/1.2.826.0.1.3680043.8.498.1.5/1.2.826.0.1.3680043.8.498.2.5.1.dcm', 1700000000);
INSERT INTO public.instances VALUES ('1.2.826.0.1.3680043.8.498.2.1.2', '1.2.826.0.1.3680043.8.498.1.1', '', '', '/spool/1.2.826.0.1.3680043.8.498.1.1/1.2.826.0.1.3680043.8.498.2.1.2.dcm', 1700000001);
INSERT INTO public.instances VALUES ('1.2.826.0.1.3680043.8.498.2.6.1', '1.2.826.0.1.3680043.8.498.1.6', '', '', '/spool/1.2.826.0.1.3680043.8.498.1.6/1.2.826.0.1.3680043.8.498.2.6.1.dcm', 1700000040);

--
-- Data for Name: results; Type: TABLE DATA; Schema: public; Owner: -
--

INSERT INTO public.results VALUES (1, '1.2.826.0.1.3680043.8.498.1.1', 'Effusion', 0.8, true, 0.5, '1.2.826.0.1.3680043.8.498.2.1.1');
INSERT INTO public.results VALUES (2, '1.2.826.0.1.3680043.8.498.1.1', 'Atelectasis', 0.1, false, 0.5, '1.2.826.0.1.3680043.8.498.2.1.1');

--
-- Data for Name: studies; Type: TABLE DATA; Schema: public; Owner: -
--

INSERT INTO public.studies VALUES (1, '1.2.826.0.1.3680043.8.498.1.1', 'done', '', '', 'b1d756e486c83e81', 1700000000, 1700000001, 1700000010, 1700000012, 1700000012, 1, NULL, NULL, false, 80, 'urgent', 'random-test-model', '0', '{"inference": 0.02}');
INSERT INTO public.studies VALUES (2, '1.2.826.0.1.3680043.8.498.1.2', 'not_eligible', 'no frontal chest image', '', '3741dbeefa7333be', 1700000000, 1700000000, 1700000010, 1700000021, 1700000021, 1, NULL, NULL, false, 0, 'routine', 'random-test-model', '0', '{}');
INSERT INTO public.studies VALUES (3, '1.2.826.0.1.3680043.8.498.1.3', 'processing', '', '', 'd1aee14ae76cc81c', 1700000000, 1700000000, 1700000010, 1700000030, NULL, 1, 'host:2:w1', 1700000090, false, NULL, NULL, '', '', '{}');
INSERT INTO public.studies VALUES (4, '1.2.826.0.1.3680043.8.498.1.4', 'failed', '', 'transient', 'e0c41b07cadc3268', 1700000000, 1700000000, 1700000010, 1700000034, NULL, 2, NULL, NULL, false, NULL, NULL, '', '', '{}');
INSERT INTO public.studies VALUES (5, '1.2.826.0.1.3680043.8.498.1.5', 'queued', '', 'transient', 'dc5d79827c8d8c1f', 1700000000, 1700000000, 1700000010, 1700000036, NULL, 1, NULL, NULL, false, NULL, NULL, '', '', '{}');
INSERT INTO public.studies VALUES (7, '1.2.826.0.1.3680043.8.498.1.6', 'receiving', '', '', '', 1700000040, 1700000040, NULL, 1700000040, NULL, 0, NULL, NULL, false, NULL, NULL, '', '', '{}');

--
-- Data for Name: worklist_meta; Type: TABLE DATA; Schema: public; Owner: -
--

INSERT INTO public.worklist_meta VALUES ('schema_version', '1');

--
-- Name: deliveries_id_seq; Type: SEQUENCE SET; Schema: public; Owner: -
--

SELECT pg_catalog.setval('public.deliveries_id_seq', 2, true);

--
-- Name: image_results_id_seq; Type: SEQUENCE SET; Schema: public; Owner: -
--

SELECT pg_catalog.setval('public.image_results_id_seq', 3, true);

--
-- Name: results_id_seq; Type: SEQUENCE SET; Schema: public; Owner: -
--

SELECT pg_catalog.setval('public.results_id_seq', 2, true);

--
-- Name: studies_id_seq; Type: SEQUENCE SET; Schema: public; Owner: -
--

SELECT pg_catalog.setval('public.studies_id_seq', 7, true);

--
-- Name: deliveries deliveries_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.deliveries
    ADD CONSTRAINT deliveries_pkey PRIMARY KEY (id);

--
-- Name: image_results image_results_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.image_results
    ADD CONSTRAINT image_results_pkey PRIMARY KEY (id);

--
-- Name: instances instances_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.instances
    ADD CONSTRAINT instances_pkey PRIMARY KEY (sop_uid);

--
-- Name: results results_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.results
    ADD CONSTRAINT results_pkey PRIMARY KEY (id);

--
-- Name: studies studies_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.studies
    ADD CONSTRAINT studies_pkey PRIMARY KEY (id);

--
-- Name: studies studies_study_uid_key; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.studies
    ADD CONSTRAINT studies_study_uid_key UNIQUE (study_uid);

--
-- Name: deliveries uq_deliveries_sop_destination; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.deliveries
    ADD CONSTRAINT uq_deliveries_sop_destination UNIQUE (sop_uid, destination);

--
-- Name: image_results uq_image_results_study_uid; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.image_results
    ADD CONSTRAINT uq_image_results_study_uid UNIQUE (study_uid, uid);

--
-- Name: results uq_results_study_finding; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.results
    ADD CONSTRAINT uq_results_study_finding UNIQUE (study_uid, finding);

--
-- Name: worklist_meta worklist_meta_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.worklist_meta
    ADD CONSTRAINT worklist_meta_pkey PRIMARY KEY (key);

--
-- Name: ix_deliveries_status_next; Type: INDEX; Schema: public; Owner: -
--

CREATE INDEX ix_deliveries_status_next ON public.deliveries USING btree (status, next_attempt_at);

--
-- Name: ix_deliveries_study; Type: INDEX; Schema: public; Owner: -
--

CREATE INDEX ix_deliveries_study ON public.deliveries USING btree (study_uid);

--
-- Name: ix_instances_study; Type: INDEX; Schema: public; Owner: -
--

CREATE INDEX ix_instances_study ON public.instances USING btree (study_uid);

--
-- Name: ix_studies_status_lease; Type: INDEX; Schema: public; Owner: -
--

CREATE INDEX ix_studies_status_lease ON public.studies USING btree (status, lease_expires_at);

--
-- Name: ix_studies_status_received; Type: INDEX; Schema: public; Owner: -
--

CREATE INDEX ix_studies_status_received ON public.studies USING btree (status, received_at);

--
-- Name: deliveries deliveries_study_uid_fkey; Type: FK CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.deliveries
    ADD CONSTRAINT deliveries_study_uid_fkey FOREIGN KEY (study_uid) REFERENCES public.studies(study_uid) ON DELETE CASCADE;

--
-- Name: image_results image_results_study_uid_fkey; Type: FK CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.image_results
    ADD CONSTRAINT image_results_study_uid_fkey FOREIGN KEY (study_uid) REFERENCES public.studies(study_uid) ON DELETE CASCADE;

--
-- Name: instances instances_study_uid_fkey; Type: FK CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.instances
    ADD CONSTRAINT instances_study_uid_fkey FOREIGN KEY (study_uid) REFERENCES public.studies(study_uid) ON DELETE CASCADE;

--
-- Name: results results_study_uid_fkey; Type: FK CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.results
    ADD CONSTRAINT results_study_uid_fkey FOREIGN KEY (study_uid) REFERENCES public.studies(study_uid) ON DELETE CASCADE;

--
-- PostgreSQL database dump complete
--

