// TMRL telemetry for TrackMania 2020.
//
// Listens on 127.0.0.1:<port>. When a client (the tmrl worker) connects, writes a 16-byte greeting that carries
// the protocol version (the worker refuses a plugin of another version, saying so), then, while a car is driving,
// one packet per game frame. A packet is 15 little-endian float32 slots (60 bytes); the layout is defined in
// services/worker/src/tmrl_worker/tm20/openplanet.py and documented in README.md next to this file.
// Each "slot N: name" / "hello N: name" comment below is checked against the Python definition by the test suite.
// A client that hangs up is noticed at once (also while no car is on track), and a new client that connects
// while one is served replaces it (a restarted worker whose old connection the system has not closed yet).

[Setting category="Connection" name="Port" description="TCP port on 127.0.0.1 (tmrl-worker --telemetry-port). If it is taken (another game instance), the next free port up to Port + 7 is used; the menu shows which." min=1024 max=65535]
int Setting_Port = 9000;

[Setting category="Connection" name="Enabled"]
bool Setting_Enabled = true;

const uint MAGIC = 0x4C524D54;      // bytes "TMRL" once written little-endian
const uint END = 0x544D524C;        // bytes "LRMT"
const uint HELLO_MAGIC = 0x49484D54;  // bytes "TMHI"
const uint HELLO_END = 0x544D4849;    // bytes "IHMT"
const uint PROTOCOL_VERSION = 2;
const uint PACKET_BYTES = 60;
const uint SEQUENCE_MODULO = 16777216;  // 2^24: every value is exact in a float32
const int PORT_ATTEMPTS = 8;

int g_listeningPort = -1;
bool g_clientConnected = false;
uint g_sequence = 0;
bool g_restart = false;

void RenderMenu()
{
    string state = g_listeningPort < 0 ? "not listening" : ("port " + g_listeningPort + (g_clientConnected ? ", worker connected" : ", waiting for the worker"));
    if (UI::MenuItem("\\$0f0TMRL\\$z telemetry: " + state, "", Setting_Enabled)) {
        Setting_Enabled = !Setting_Enabled;
        g_restart = true;
    }
}

void OnSettingsChanged()
{
    g_restart = true;  // a new port takes effect at once
}

// Bind the configured port, or the next free one (several game instances on one machine).
Net::Socket@ OpenListener()
{
    for (int offset = 0; offset < PORT_ATTEMPTS; offset++) {
        auto listener = Net::Socket();
        if (listener.Listen("127.0.0.1", Setting_Port + offset)) {
            g_listeningPort = Setting_Port + offset;
            print("TMRL telemetry: listening on 127.0.0.1:" + g_listeningPort);
            return listener;
        }
    }
    error("TMRL telemetry: ports " + Setting_Port + " to " + (Setting_Port + PORT_ATTEMPTS - 1) + " are all taken");
    return null;
}

// The script API of the driving player, or null while no car is on track (menus, loading, editor).
CSmScriptPlayer@ DrivingPlayer(CSmArenaClient@ &out playground)
{
    auto app = cast<CTrackMania>(GetApp());
    if (app is null) return null;
    @playground = cast<CSmArenaClient>(app.CurrentPlayground);
    if (playground is null || playground.Arena is null || playground.Arena.Players.Length == 0) return null;
    auto player = playground.Arena.Players[0];
    if (player is null) return null;  // the list can hold a null entry while the map loads or a player leaves
    return cast<CSmScriptPlayer>(player.ScriptAPI);
}

bool RaceFinished(CSmArenaClient@ playground)
{
    if (playground.GameTerminals.Length == 0) return false;
    return playground.GameTerminals[0].UISequence_Current == SGamePlaygroundUIConfig::EUISequence::Finish;
}

void WritePacket(MemoryBuffer@ buf, CSmScriptPlayer@ car, bool finished)
{
    buf.Seek(0, 0);
    buf.Write(MAGIC);                                   // slot 0: magic
    buf.Write(float(PROTOCOL_VERSION));                 // slot 1: version
    buf.Write(float(g_sequence));                       // slot 2: sequence
    buf.Write(float(car.Speed));                        // slot 3: speed
    buf.Write(float(car.Distance));                     // slot 4: distance
    buf.Write(float(car.Position.x));                   // slot 5: x
    buf.Write(float(car.Position.y));                   // slot 6: y
    buf.Write(float(car.Position.z));                   // slot 7: z
    buf.Write(float(car.InputSteer));                   // slot 8: steer
    buf.Write(float(car.InputGasPedal));                // slot 9: gas
    buf.Write(car.InputIsBraking ? 1.0f : 0.0f);        // slot 10: brake
    buf.Write(finished ? 1.0f : 0.0f);                  // slot 11: finished
    buf.Write(float(car.EngineCurGear));                // slot 12: gear
    buf.Write(float(car.EngineRpm));                    // slot 13: rpm
    buf.Write(END);                                     // slot 14: end
    buf.Seek(0, 0);
    g_sequence = (g_sequence + 1) % SEQUENCE_MODULO;
}

// The greeting sent once to each new client: the worker checks the version before it reads any packet.
bool WriteHello(Net::Socket@ client)
{
    MemoryBuffer@ hello = MemoryBuffer(16);
    hello.Write(HELLO_MAGIC);                           // hello 0: magic
    hello.Write(PROTOCOL_VERSION);                      // hello 1: version
    hello.Write(PACKET_BYTES);                          // hello 2: packet_bytes
    hello.Write(HELLO_END);                             // hello 3: end
    hello.Seek(0, 0);
    return client.Write(hello);
}

// Stream packets to one worker until it hangs up, another worker connects, the plugin is disabled or the port
// changes. Returns the worker that replaced this one, or null.
Net::Socket@ Serve(Net::Socket@ listener, Net::Socket@ client)
{
    g_clientConnected = true;
    Net::Socket@ next = null;
    MemoryBuffer@ buf = MemoryBuffer(PACKET_BYTES);
    if (!WriteHello(client)) {
        print("TMRL telemetry: the worker left before the greeting");
    } else {
        while (!g_restart) {
            if (client.IsHungUp()) {  // noticed even while nothing is written (menus, loading)
                print("TMRL telemetry: worker disconnected");
                break;
            }
            if (listener.CanRead()) {  // a new worker: it replaces this one
                @next = listener.Accept();
                if (next !is null) {
                    print("TMRL telemetry: a new worker connected; closing the previous connection");
                    break;
                }
            }
            CSmArenaClient@ playground = null;
            auto car = DrivingPlayer(playground);
            if (car !is null) {
                WritePacket(buf, car, RaceFinished(playground));
                if (!client.Write(buf)) {
                    print("TMRL telemetry: worker disconnected");
                    break;
                }
            }
            yield();  // next game frame
        }
    }
    client.Close();
    g_clientConnected = false;
    return next;
}

void Main()
{
    while (true) {
        g_restart = false;
        if (!Setting_Enabled) {
            g_listeningPort = -1;
            while (!g_restart) yield();
            continue;
        }
        auto listener = OpenListener();
        if (listener is null) {
            while (!g_restart) yield();  // wait for another port in the settings
            continue;
        }
        while (!g_restart) {
            if (listener.CanRead()) {  // a worker is connecting
                auto client = listener.Accept();
                while (client !is null) @client = Serve(listener, client);
            }
            yield();
        }
        listener.Close();
        g_listeningPort = -1;
    }
}
