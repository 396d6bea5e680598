// Shared helpers for the scenario scripts run by tests/test_js_clients.py.
//
// Every scenario script is invoked as `node <script>.mjs '<json params>'` with at least
//   { "host": "127.0.0.1", "port": 6001, "key": "key1", "auth": "http://127.0.0.1:PORT" }
// and talks to the test over a line protocol:
//   stdout: one JSON object per line, always with a "type" field
//           ("ready", "event", ..., "done" at the end, "error" on failure);
//   stdin:  one JSON object per line, sent by the test when the scenario waits for it
//           (`await command("go")`), e.g. after the test has triggered an event or queried the API.
// Each script exits by itself: 0 after "done", 1 on any failure or when the hard deadline
// (params.deadline_ms, default 20 s) passes. Per-step waits time out after params.step_ms (5 s).
import { createInterface } from 'node:readline';
import Pusher from 'pusher-js';

export const params = JSON.parse(process.argv[2] || process.env.SCENARIO_PARAMS || '{}');
const STEP_MS = params.step_ms ?? 5000;
const DEADLINE_MS = params.deadline_ms ?? 20000;

export { Pusher };

/** Prints one machine-readable result line. */
export function emit(type, fields = {}) {
  process.stdout.write(JSON.stringify({ type, ...fields }) + '\n');
}

const clients = [];

function fail(err) {
  emit('error', { message: String((err && err.stack) || err) });
  for (const c of clients) {
    try { c.disconnect(); } catch { /* ignore */ }
  }
  process.exit(1);
}

process.on('unhandledRejection', fail);
process.on('uncaughtException', fail);
const hardDeadline = setTimeout(() => fail(new Error(`scenario deadline of ${DEADLINE_MS} ms passed`)), DEADLINE_MS);
hardDeadline.unref();

/** Rejects when `promise` has not settled within `ms`. */
export function within(promise, what, ms = STEP_MS) {
  let timer;
  return Promise.race([
    promise,
    new Promise((_, reject) => {
      timer = setTimeout(() => reject(new Error(`timeout after ${ms} ms waiting for ${what}`)), ms);
    }),
  ]).finally(() => clearTimeout(timer));
}

/** Resolves with [data, metadata] of the next `event` on a channel / connection / user emitter. */
export function once(emitter, event, what = event) {
  return within(new Promise((resolve) => {
    const handler = (data, metadata) => {
      emitter.unbind(event, handler);
      resolve([data, metadata]);
    };
    emitter.bind(event, handler);
  }), what);
}

/** Records every non-internal event a channel gets, in order (channel.bind_global). */
export function record(channel) {
  const log = [];
  channel.bind_global((event, data) => log.push({ event, data }));
  return log;
}

// ---- stdin commands from the test -------------------------------------------------------------
const queued = [];
const waiting = [];
const rl = createInterface({ input: process.stdin });
rl.on('line', (line) => {
  if (!line.trim()) return;
  const msg = JSON.parse(line);
  const w = waiting.shift();
  if (w) w(msg); else queued.push(msg);
});

/** Waits for the next command line from the test; checks its "cmd" field when `name` is given. */
export async function command(name, ms = STEP_MS * 2) {
  const msg = queued.length ? queued.shift()
    : await within(new Promise((resolve) => waiting.push(resolve)), `command ${name}`, ms);
  if (name && msg.cmd !== name) throw new Error(`expected command ${name}, got ${JSON.stringify(msg)}`);
  return msg;
}

// ---- clients ----------------------------------------------------------------------------------
/**
 * pusher-js options for the server under test; auth goes to the test's HTTP auth server
 * (transport 'ajax': pusher-js's Node build posts form data with its bundled XMLHttpRequest).
 * `user` picks the identity the auth server signs for presence channel_data and sign-in.
 */
/** Where the server is: the connection options pusher-js and Echo share. */
export const serverOptions = {
  cluster: 'mt1',
  wsHost: params.host,
  wsPort: params.port,
  wssPort: params.port,
  forceTLS: false,
  enabledTransports: ['ws'],
  disableStats: true,
};

export function pusherOptions(user, extra = {}) {
  const q = user ? `?user_id=${encodeURIComponent(user)}` : '';
  return {
    ...serverOptions,
    activityTimeout: 30000,
    pongTimeout: 10000,
    channelAuthorization: { endpoint: `${params.auth}/auth${q}`, transport: 'ajax' },
    userAuthentication: { endpoint: `${params.auth}/user-auth${q}`, transport: 'ajax' },
    ...extra,
  };
}

/** A connected pusher-js client. */
export async function connect(user, extra = {}) {
  const client = new Pusher(params.key, pusherOptions(user, extra));
  clients.push(client);
  if (client.connection.state !== 'connected') {
    await within(new Promise((resolve, reject) => {
      client.connection.bind('connected', resolve);
      client.connection.bind('failed', () => reject(new Error('connection failed')));
      client.connection.bind('unavailable', () => reject(new Error('connection unavailable')));
    }), `connection of ${user || 'anonymous client'}`);
  }
  return client;
}

/** Subscribes and resolves with the pusher:subscription_succeeded payload (members for presence). */
export async function subscribe(client, name) {
  const channel = client.subscribe(name);
  const result = await within(new Promise((resolve, reject) => {
    channel.bind('pusher:subscription_succeeded', (data) => resolve(data));
    channel.bind('pusher:subscription_error', (err) => reject(
      new Error(`subscription_error on ${name}: ${JSON.stringify(err)}`)));
  }), `subscription to ${name}`);
  return [channel, result];
}

/** Serializable view of a pusher-js presence Members object. */
export function members(m) {
  return { count: m.count, me: m.me, members: m.members, myID: m.myID };
}

/** Disconnects every client, emits "done" and exits 0 once the sockets have closed. */
export async function done(fields = {}) {
  for (const c of clients) c.disconnect();
  emit('done', fields);
  setTimeout(() => process.exit(0), 50);
}

/** Runs the scenario body with the uniform error handling. */
export function run(body) {
  body().catch(fail);
}
