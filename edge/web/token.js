// The device token. `voicebus token --url` puts it in the link's fragment (#token=...),
// which browsers never send to a server or in a Referer; the page moves it to
// sessionStorage (this tab only) and removes it from the address bar, so it is not
// bookmarked, shared with the link or left on screen.

const KEY = "voicebus.token";

export function takeToken() {
  const params = new URLSearchParams(location.hash.slice(1));
  const fromLink = params.get("token");
  if (fromLink) {
    storeToken(fromLink);
    params.delete("token");
    const rest = params.toString();
    history.replaceState(null, "", location.pathname + location.search + (rest ? `#${rest}` : ""));
  }
  return sessionStorage.getItem(KEY);
}

export function storeToken(token) {
  sessionStorage.setItem(KEY, token);
}

// Whether the gateway accepts the token, asked over plain HTTP (edge/web_page.py): a
// browser's WebSocket never tells a script why a handshake was refused.
// -> {ok: true, userId} | {ok: false, reason} (refused) | {ok: null, reason} (no answer)
export async function checkToken(token) {
  let response;
  try {
    response = await fetch(new URL("v1/token", location.href), {
      headers: { Authorization: `Bearer ${token}` }, cache: "no-store",
    });
  } catch (error) {
    return { ok: null, reason: "the gateway does not answer" };
  }
  const body = await response.json().catch(() => ({}));
  if (response.ok) return { ok: true, userId: body.user_id };
  if (response.status === 401) return { ok: false, reason: body.reason || "refused" };
  return { ok: null, reason: `the gateway answered HTTP ${response.status}` };
}
