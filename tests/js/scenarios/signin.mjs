// 5. User authentication: pusher.signin() against the userAuthentication endpoint, then an
// event the test sends with the SDK's send_to_user reaches pusher.user.bind(event).
import { params, connect, once, emit, done, run, within } from '../lib.mjs';

run(async () => {
  const client = await connect(params.user_id);
  const signin = new Promise((resolve) => client.connection.bind('message', (m) => {
    if (m.event === 'pusher:signin_success') resolve(m.data);
  }));
  client.signin();
  const success = await within(signin, 'pusher:signin_success');
  await within(client.user.signinDonePromise, 'signinDonePromise');
  // pusher-js subscribes to #server-to-user-<id> after signin_success; wait for it.
  await within(new Promise((resolve) => {
    const poll = () => (client.user.serverToUserChannel?.subscribed ? resolve() : setTimeout(poll, 10));
    poll();
  }), 'the #server-to-user channel subscription');
  const got = once(client.user, params.event);
  emit('ready', {
    socket_id: client.connection.socket_id,
    signin_success: success,
    user_data: client.user.user_data,
    server_to_user_channel: client.user.serverToUserChannel.name,
  });
  emit('event', { data: (await got)[0] });
  await done();
});
